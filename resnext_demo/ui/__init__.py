"""The app layer, the only part of the package that imports gradio: one module per tab (its layout, its
handlers, its ZeroGPU bookings), `context` (what the tabs share), `serving` (queues, caps, bookings, errors as
toasts, the prediction lane) and `demo` (the page and the links between tabs)."""
from .demo import CSS, THEME, build_demo
from .serving import MAX_FILE_SIZE, on_zero_gpu

__all__ = ["CSS", "MAX_FILE_SIZE", "THEME", "build_demo", "on_zero_gpu"]
