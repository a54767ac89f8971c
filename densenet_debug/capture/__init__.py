"""Op-level capture: what every aten op of a step saw and produced, forward and backward.

The foundation of the op-level engine (issue 12): a dispatch mode records every aten op call as a typed
:class:`~densenet_debug.capture.records.OpRecord`, attributed to the module it ran under (forward: module
hooks; backward: the autograd node's sequence number, which names the forward op that created it).
:func:`align` joins two captures by key; :func:`kink_sites` lists, per piecewise op, the elements near its
branch boundary. Capture holds no verdict logic; the judge builds on it.

``graph`` and ``cow`` also serve :class:`densenet_debug.trace.Tracer`: sequence-number node discovery instead
of module full backward hooks (which crash on in-place models), and copy-on-write for kept aliases.
"""
