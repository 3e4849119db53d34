"""The one error type the app shows to a visitor as is.

Library functions raise `UserError` for what a visitor or an API caller can fix (a bad file, a choice that does not
exist, a value out of range); the app turns exactly these into a toast. Any other exception is a bug: it keeps its
traceback in the server log and reaches the page as Gradio's generic error, not as a misleading hint.
"""


class UserError(ValueError):
    """Something the visitor can fix; the message is written for them. A ValueError, so callers may catch either."""
