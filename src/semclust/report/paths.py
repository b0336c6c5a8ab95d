"""How image URIs and free text are shown, so that a published report leaks no local paths."""

from __future__ import annotations

import posixpath
import re

from semclust import storage

# An absolute local directory (optionally as file://), not one inside a URL or a fraction: the
# character before the leading "/" must not belong to a word, a scheme or another path.
_LOCAL_DIRS = re.compile(r"(?<![\w.:/~-])(?:file://)?/(?:[^/\s'\"<>]+/)+")


class PathDisplay:
    """Turns URIs into short captions; hides local directories when the report is published.

    ``input_root`` is the run's input folder/prefix: images under it are shown relative to it.
    With ``hide_local`` (a report written to object storage) every absolute local directory in a
    URI or a message is replaced by ``…/``, keeping only the file name.
    """

    def __init__(self, input_root: str | None, hide_local: bool) -> None:
        self.hide_local = hide_local
        self.input_root: str | None = None
        if input_root:
            try:
                self.input_root = storage.canonical_uri(input_root).rstrip("/") + "/"
            except ValueError:
                self.input_root = None

    def uri(self, uri: str) -> str:
        """Caption of an image URI: relative to the input root where possible."""
        if self.input_root and uri.startswith(self.input_root):
            return uri[len(self.input_root) :]
        if self.hide_local and not storage.is_remote(uri):
            return self.text(uri)
        return uri

    def full(self, uri: str) -> str:
        """The URI for a tooltip: whole, unless local paths are hidden."""
        if self.hide_local and not storage.is_remote(uri):
            return self.uri(uri)
        return uri

    def text(self, text: str) -> str:
        """Free text (an error message, a config value) with local directories hidden."""
        if not self.hide_local:
            return text
        return _LOCAL_DIRS.sub("…/", text)

    def root_caption(self) -> str:
        """How the input root itself is named in the report."""
        if not self.input_root:
            return ""
        root = self.input_root.rstrip("/")
        if self.hide_local and not storage.is_remote(root):
            return posixpath.basename(root)
        return root
