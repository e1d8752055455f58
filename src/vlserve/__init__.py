"""vlserve."""
