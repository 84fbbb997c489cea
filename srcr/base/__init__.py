"""The vocabulary every layer of srcr shares; it imports nothing of srcr's other packages."""
