"""Using a trained backbone: frozen-feature evaluation, reconstruction pictures, export, the demo."""
