"""Small argument predicates shared by the entry points, which validate once (docs/design.md,
"Methods"); the hot path keeps only internal asserts."""
import numbers


def is_int(v):
    """A whole number that is not a bool (``True`` is an ``Integral`` in Python, never a count here)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)
