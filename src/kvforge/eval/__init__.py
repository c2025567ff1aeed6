"""`kvforge eval`: quality measured next to the KV bytes each cache setting uses."""
