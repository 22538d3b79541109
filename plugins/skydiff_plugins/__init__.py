"""Built-in skydiff algorithms, each registered exactly like a third-party plugin."""
