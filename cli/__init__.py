"""Command-line tools (mkcomposefs, composefs-info, ...) over the composefs core."""
