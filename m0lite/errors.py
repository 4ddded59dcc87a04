"""The errors m0lite raises for bad input, each naming what is wrong.

All derive from ValueError so that callers that catch ValueError keep working;
the server maps them to HTTP status codes.
"""


class M0liteError(ValueError):
    """Base class of every error m0lite raises on purpose."""


class InputError(M0liteError):
    """A query, document, pair list or option is malformed."""


class ImageError(InputError):
    """An image cannot be loaded, decoded or preprocessed (names the image)."""


class ImageTooLargeError(ImageError):
    """An image (bytes or pixels) is over a configured limit."""


class WeightsError(M0liteError):
    """A checkpoint is missing, corrupt, or does not match the config (names the key and file)."""


class PdfError(InputError):
    """A PDF cannot be read or rendered: encrypted, corrupt, no pages, a bad page (names the document and page)."""


class PdfTooLargeError(PdfError):
    """A PDF (bytes, pages, or a page's rendered pixels) is over a configured limit."""
