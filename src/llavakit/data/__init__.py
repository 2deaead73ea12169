"""Data: readers -> conversations -> templates -> token ids + labels -> batches."""
