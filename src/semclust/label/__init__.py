"""Labelling: reference images, seed labels and cluster names -> ``labels/``.

The stage is ``semclust.label.stage``; ``refs``, ``seeds`` and ``names`` are its three modes and
``common`` what they share (the run's kNN graph, the labels/ writer).
"""
