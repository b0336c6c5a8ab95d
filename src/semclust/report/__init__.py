"""The report stage: a static, self-contained HTML review of a run.

``stage`` is the stage (settings / run / summary), ``build.build_report`` the work: ``collect``
and ``findings`` read what the pages show (in Ray tasks where it is large), ``thumbs`` makes
the thumbnails, ``map2d`` the 2-D map, and ``views``, ``markup``, ``render`` and ``overview``
the HTML.
"""

from semclust.report.build import build_report

__all__ = ["build_report"]
