"""Input kinds of the embed stage: one module per kind, registered in
``semclust.registry.INPUT_KINDS``. Each defines ``matches(uri) -> bool`` and
``pages(stream, uri)``, yielding listing pages (``sources.PAGE_SCHEMA``) and counting what it
skips on ``stream`` (an ``sources.InputStream``, which de-duplicates and counts the rest)."""
