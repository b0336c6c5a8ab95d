// semclust serve: the page. Plain DOM, no build step. Every value from the service is put on
// the page as text (textContent, attributes set one by one), never as markup.
"use strict";

const PAGE = 60; // images per gallery page
const CLUSTER_PAGE = 24; // clusters per list page
const THUMB = 256;

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined) continue;
    if (key === "text") node.textContent = String(value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, String(value));
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

function status(message, isError = false) {
  const s = $("status");
  s.textContent = message || "";
  s.classList.toggle("error", Boolean(isError));
}

async function api(path, options = {}) {
  const response = await fetch(path, options);
  let body = null;
  try {
    body = await response.json();
  } catch (e) {
    body = null;
  }
  if (!response.ok) {
    const message = body && body.error ? body.error : `${response.status} ${response.statusText}`;
    throw new Error(message);
  }
  return body;
}

const thumbUrl = (ref, size = THUMB) => `images/${encodeURIComponent(ref)}?size=${size}`;

function fileName(uri) {
  const parts = String(uri).split("/");
  return parts[parts.length - 1] || String(uri);
}

// A video frame's time as m:ss.s (h:mm:ss.s from an hour), as the report and the CLI show it.
function clock(seconds) {
  const tenths = Math.round(Number(seconds) * 10);
  const hours = Math.floor(tenths / 36000);
  const minutes = Math.floor((tenths % 36000) / 600);
  const secs = ((tenths % 600) / 10).toFixed(1).padStart(4, "0");
  return hours ? `${hours}:${String(minutes).padStart(2, "0")}:${secs}` : `${minutes}:${secs}`;
}

// What a row is called: the file's name, and "@ m:ss.s" for a frame of a video.
function rowName(row) {
  const name = fileName(row.uri);
  return row.frame_time === null || row.frame_time === undefined ? name
    : `${name} @ ${clock(row.frame_time)}`;
}

function imageCard(hit, score) {
  const ref = hit.image_ref;
  const meta = el("div", { class: "meta" });
  if (score !== undefined && score !== null) {
    meta.append(el("b", { text: Number(score).toFixed(3) }), " ");
  }
  meta.append(el("span", { text: rowName(hit), title: hit.uri }));
  if (hit.cluster !== null && hit.cluster !== undefined) {
    meta.append(el("br"), el("a", { href: `#/cluster/${hit.cluster}`, text: `cluster ${hit.cluster}`,
                                    class: "cluster-link" }));
  }
  if (hit.label) meta.append(" · ", el("span", { class: "label", text: hit.label }));
  return el(
    "div",
    { class: "card hit", dataset: { imageId: ref, uri: hit.uri, cluster: hit.cluster ?? "" } },
    el("a", { href: `#/image/${ref}`, title: hit.uri },
       el("img", { src: thumbUrl(ref), alt: rowName(hit), loading: "lazy" })),
    meta,
  );
}

// --- search ---------------------------------------------------------------------------

async function searchUpload(file) {
  if (!file) return;
  const preview = $("query-preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  const form = new FormData();
  form.append("image", file, file.name);
  form.append("k", String(Math.max(1, Math.min(1000, Number($("query-k").value) || 20))));
  status(`searching for ${file.name} ...`);
  $("results").replaceChildren();
  const started = performance.now();
  try {
    const answer = await api("search", { method: "POST", body: form });
    const hits = answer.results[0].hits;
    $("results").replaceChildren(...hits.map((h) => imageCard(h, h.similarity)));
    const ms = Math.round(performance.now() - started);
    status(`${hits.length} nearest images to ${file.name} (${ms} ms)`);
  } catch (e) {
    status(`search failed: ${e.message}`, true);
  }
}

function setUpSearch() {
  const input = $("query-file");
  input.addEventListener("change", () => searchUpload(input.files[0]));
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer.files.length) searchUpload(e.dataTransfer.files[0]);
  });
}

// --- clusters -------------------------------------------------------------------------

function pager(node, page, pages, go) {
  const prev = el("button", { type: "button", id: `${node.id}-prev`, text: "previous" });
  const next = el("button", { type: "button", id: `${node.id}-next`, text: "next" });
  prev.disabled = page <= 0;
  next.disabled = page >= pages - 1;
  prev.addEventListener("click", () => go(page - 1));
  next.addEventListener("click", () => go(page + 1));
  node.replaceChildren(prev, el("span", { class: "page-info", text: `page ${page + 1} of ${Math.max(pages, 1)}` }), next);
}

function clusterTitle(c) {
  return c.name || (c.label ? `${c.label} (${Math.round(100 * c.label_share)} % labelled so)` : "unnamed");
}

async function showClusters(params) {
  const page = Math.max(0, Number(params.get("page")) || 0);
  const sort = params.get("sort") || $("cluster-sort").value;
  const order = params.get("order") || $("cluster-order").value;
  $("cluster-sort").value = sort;
  $("cluster-order").value = order;
  status("loading clusters ...");
  try {
    const q = new URLSearchParams({ offset: page * CLUSTER_PAGE, limit: CLUSTER_PAGE, sort, order });
    const answer = await api(`clusters?${q}`);
    const cards = answer.clusters.map((c) => el(
      "div",
      { class: "card cluster-card", dataset: { cluster: c.id } },
      el("a", { href: `#/cluster/${c.id}` },
         el("div", { class: "previews" },
            ...c.preview.map((ref) => el("img", { src: thumbUrl(ref, 128), alt: "", loading: "lazy" }))),
         el("div", { class: "meta" },
            el("b", { text: `cluster ${c.id}` }), ` · ${c.size} images`,
            c.cohesion !== null ? ` · cohesion ${Number(c.cohesion).toFixed(3)}` : "",
            el("br"), el("span", { class: "cluster-name", text: clusterTitle(c) }))),
    ));
    $("cluster-list").replaceChildren(...cards);
    const pages = Math.ceil(answer.total / CLUSTER_PAGE);
    pager($("clusters-pager"), page, pages, (p) => {
      location.hash = `#/clusters?${new URLSearchParams({ page: p, sort, order })}`;
    });
    status(`${answer.total} clusters, sorted by ${sort} (cohesion: ${answer.cohesion_name})`);
  } catch (e) {
    status(`clusters: ${e.message}`, true);
  }
}

async function showCluster(id, params) {
  const page = Math.max(0, Number(params.get("page")) || 0);
  // Images per page: ?per= in the address (a smaller page on a small screen), else PAGE.
  const per = Math.max(1, Math.min(500, Number(params.get("per")) || PAGE));
  status(`loading cluster ${id} ...`);
  try {
    const answer = await api(`clusters/${encodeURIComponent(id)}?offset=${page * per}&limit=${per}`);
    $("cluster-title").textContent = `Cluster ${answer.id}: ${clusterTitle(answer)}`;
    $("cluster-facts").textContent =
      `${answer.size} images, nearest the centroid first` +
      (answer.cohesion !== null ? `; ${answer.cohesion_name} ${Number(answer.cohesion).toFixed(3)}` : "");
    $("name-input").value = answer.name || "";
    $("name-form").dataset.cluster = answer.id;
    $("name-status").textContent = "";
    $("gallery").replaceChildren(...answer.members.map((m) => {
      const card = imageCard(m, m.similarity);
      card.classList.add("member");
      return card;
    }));
    const pages = Math.ceil(answer.size / per);
    pager($("gallery-pager"), page, pages, (p) => {
      location.hash = `#/cluster/${answer.id}?${new URLSearchParams({ page: p, per })}`;
    });
    const first = page * per + 1;
    status(`cluster ${answer.id}: images ${first}-${first + answer.members.length - 1} of ${answer.size}`);
  } catch (e) {
    status(`cluster ${id}: ${e.message}`, true);
  }
}

function setUpNaming() {
  $("name-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const id = $("name-form").dataset.cluster;
    const name = $("name-input").value.trim();
    try {
      const answer = name
        ? await api(`clusters/${encodeURIComponent(id)}/name`, {
          method: "PUT", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ name }),
        })
        : await api(`clusters/${encodeURIComponent(id)}/name`, { method: "DELETE" });
      $("name-status").textContent = answer.name
        ? `saved; apply with: ${answer.label_command}` : "name removed";
      $("cluster-title").textContent = `Cluster ${id}: ${answer.name || "unnamed"}`;
    } catch (err) {
      $("name-status").textContent = `not saved: ${err.message}`;
    }
  });
}

// --- one image ------------------------------------------------------------------------

async function showImage(ref) {
  status("loading neighbours ...");
  $("neighbors").replaceChildren();
  try {
    let image;
    let hits;
    try {
      const answer = await api(`images/${encodeURIComponent(ref)}/neighbors`);
      image = answer.image;
      hits = answer.neighbors;
    } catch (e) {
      // No kNN graph in this run: ask the index instead.
      const answer = await api("search", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ image_id: ref, k: 21 }),
      });
      hits = answer.results[0].hits.filter((h) => h.image_ref !== ref);
      image = { image_ref: ref, uri: "", cluster: null, label: null };
    }
    const when = image.frame_time === null || image.frame_time === undefined ? ""
      : ` @ ${clock(image.frame_time)}`;
    const facts = el("div", { class: "meta" }, el("div", { text: image.uri + when }));
    if (image.cluster !== null) {
      facts.append(el("a", { href: `#/cluster/${image.cluster}`, text: `cluster ${image.cluster}` }));
    }
    if (image.label) facts.append(el("div", { text: `label: ${image.label}` }));
    $("image-focus").replaceChildren(
      el("a", { href: `images/${encodeURIComponent(ref)}`, target: "_blank", rel: "noopener" },
         el("img", { src: thumbUrl(ref, 512), alt: rowName(image) })),
      facts,
    );
    $("neighbors").replaceChildren(...hits.map((h) => imageCard(h, h.similarity)));
    status(`${hits.length} nearest neighbours`);
  } catch (e) {
    status(`image ${ref}: ${e.message}`, true);
  }
}

// --- routing --------------------------------------------------------------------------

function route() {
  const hash = location.hash.replace(/^#\/?/, "");
  const [path, query] = hash.split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean);
  const view = parts[0] || "search";
  for (const name of ["search", "clusters", "cluster", "image"]) {
    $(`view-${name}`).hidden = name !== view;
  }
  $("nav-search").classList.toggle("active", view === "search");
  $("nav-clusters").classList.toggle("active", view === "clusters" || view === "cluster");
  if (view === "clusters") showClusters(params);
  else if (view === "cluster" && parts[1]) showCluster(parts[1], params);
  else if (view === "image" && parts[1]) showImage(parts[1]);
  else {
    $("view-search").hidden = false;
    status("");
  }
}

async function start() {
  setUpSearch();
  setUpNaming();
  for (const id of ["cluster-sort", "cluster-order"]) {
    $(id).addEventListener("change", () => {
      const q = new URLSearchParams({ page: 0, sort: $("cluster-sort").value, order: $("cluster-order").value });
      location.hash = `#/clusters?${q}`;
    });
  }
  window.addEventListener("hashchange", route);
  try {
    const h = await api("health");
    $("run-facts").textContent =
      `${h.images} images · ${h.clusters} clusters · ${h.backbone} · ${h.index} · ${h.run_dir}`;
  } catch (e) {
    status(`the service does not answer: ${e.message}`, true);
  }
  route();
}

document.addEventListener("DOMContentLoaded", start);
