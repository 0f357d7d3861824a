"""How many items of each class go to training / validation / test."""

from __future__ import annotations

#: Default fractions of training, validation and test.
SPLIT_FRACTIONS = (0.5, 0.25, 0.25)


def split_counts(n: int, what: str = "items", val_fraction: float = SPLIT_FRACTIONS[1]) -> dict[str, int]:
    """Split ``n`` items of one class 50/25/25 into training/validation/test, at least one in each.

    Rounding goes to validation and test first (``round(n / 4)`` each, at least 1), training gets the rest.
    ``val_fraction`` moves items between training and validation (the test share stays 25 %).
    Raises ``ValueError`` naming ``what`` when ``n < 3`` (a split would be left without that class) or when
    ``val_fraction`` leaves training empty.
    """
    if int(n) != n or n < 3:
        raise ValueError(f"need at least 3 {what} (one per training/validation/test split), got {n!r}")
    n_val = max(1, round(n * val_fraction))
    n_test = max(1, round(n * SPLIT_FRACTIONS[2]))
    if n - n_val - n_test < 1:
        raise ValueError(f"val_fraction {val_fraction} leaves no training {what} of {n}")
    return {"training": int(n - n_val - n_test), "validation": int(n_val), "test": int(n_test)}
