"""Each bench/ harness run once at a tiny size: proof that it still works, never its figures."""
