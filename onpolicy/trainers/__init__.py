"""One trainer per stage, each readable top to bottom."""
