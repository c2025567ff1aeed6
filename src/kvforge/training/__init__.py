"""Training kvforge's built-in model, and the data it and `kvforge eval` use."""
