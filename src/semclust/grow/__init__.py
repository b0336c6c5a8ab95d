"""Runs that grow: ``semclust add`` embeds new images into a finished run and extends its
assignments, kNN graph, near-duplicate groups, index and labels without changing what is there
(``stage``), and measures how far the new images drift from the clusters (``drift``)."""
