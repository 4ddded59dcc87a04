"""m0lite: a minimal, fast reimplementation of the jina-reranker-m0 multimodal reranker."""

from . import cpu  # noqa: F401  (first: it caps oneDNN and MKL where M0LITE_CPU_ISA masks the CPU)
from .errors import ImageError, ImageTooLargeError, InputError, M0liteError, WeightsError
from .reranker import Reranker

__all__ = ["Reranker", "M0liteError", "InputError", "ImageError", "ImageTooLargeError", "WeightsError"]
__version__ = "0.1.0"
