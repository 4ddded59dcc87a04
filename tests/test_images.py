"""m0lite.images against transformers' Qwen2-VL PIL processor, and every way loading can fail.

Parity: the reference is what the original reranker does, `Qwen2VLImageProcessorPil` with the
reranker's pixel bounds, fed either the PIL object itself or the string (path, base64, data:
URI, URL), which it loads with `transformers.image_utils.load_image`. Failures: local files
and HTTP servers on 127.0.0.1 that the tests start themselves; nothing else is contacted.
"""

from __future__ import annotations

import base64
import functools
import http.server
import io
import math
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from m0lite.images import fetch as mi_fetch
from m0lite.errors import ImageError, ImageTooLargeError, InputError
from m0lite.images import load_image, num_visual_tokens, preprocess, smart_resize
from m0lite.images.preprocess import IMAGE_MEAN, IMAGE_STD, PATCH_DIM

pytest.importorskip("transformers")
from transformers.image_utils import load_image as hf_load_image  # noqa: E402
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_qwen  # noqa: E402


# --- helpers ---------------------------------------------------------------


@functools.cache
def hf_processor(min_pixels: int = 3136, max_pixels: int = 602112):
    return hf_qwen.Qwen2VLImageProcessorPil(size={"shortest_edge": min_pixels, "longest_edge": max_pixels})


def reference(src, **bounds) -> tuple[np.ndarray, tuple[int, ...]]:
    """What the original feeds the vision tower: strings go through transformers' load_image."""
    out = hf_processor(**bounds)(images=src, return_tensors="np")
    return out["pixel_values"], tuple(int(v) for v in out["image_grid_thw"][0])


def assert_parity(ours_src, ref_src=None, **bounds) -> Image.Image:
    ref_pv, ref_grid = reference(ours_src if ref_src is None else ref_src, **bounds)
    img = load_image(ours_src)
    assert img.mode == "RGB"
    pv, grid = preprocess(img, **bounds)
    assert isinstance(pv, torch.Tensor) and pv.dtype == torch.float32
    assert grid == ref_grid
    assert pv.shape == (grid[1] * grid[2], PATCH_DIM) == ref_pv.shape
    assert float(np.abs(pv.numpy() - ref_pv).max()) <= 1e-5
    return img


def noise(mode: str, w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    u8 = lambda *shape: rng.integers(0, 256, (h, w, *shape), dtype=np.uint8)  # noqa: E731
    if mode == "RGB":
        return Image.fromarray(u8(3), "RGB")
    if mode == "RGBA":
        return Image.fromarray(u8(4), "RGBA")
    if mode == "LA":
        return Image.fromarray(u8(2), "LA")
    if mode == "L":
        return Image.fromarray(u8(), "L")
    if mode == "1":
        return Image.fromarray(rng.integers(0, 2, (h, w)).astype(bool))
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    if mode == "CMYK":
        return Image.frombytes("CMYK", (w, h), u8(4).tobytes())
    if mode.startswith("P"):
        img = Image.fromarray(u8(), "L").convert("P")
        img.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
        if mode == "P+trns":  # one transparent palette index
            img.info["transparency"] = 3
        if mode == "P+alpha":  # a full tRNS alpha table (transparency stored as bytes)
            img.info["transparency"] = rng.integers(0, 256, 256, dtype=np.uint8).tobytes()
        return img
    if mode == "L+trns":
        img = Image.fromarray(u8(), "L")
        img.info["transparency"] = 7
        return img
    if mode == "RGB+trns":  # a colour key that actually occurs in the image
        arr = u8(3)
        arr[: h // 2, : w // 3] = (10, 20, 30)
        img = Image.fromarray(arr, "RGB")
        img.info["transparency"] = (10, 20, 30)
        return img
    raise ValueError(mode)


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def save(tmp_path: Path, name: str, img: Image.Image, fmt: str = "PNG", **kw) -> Path:
    path = tmp_path / name
    path.write_bytes(encode(img, fmt, **kw))
    return path


def png_declaring(width: int, height: int, *, full: bool = False) -> bytes:
    """A 1-bit greyscale PNG declaring width x height. With `full`, every row is there (a real
    zip bomb of one colour, ~100 KB for 30000x30000); otherwise the data stops after one row."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + math.ceil(width / 8))  # filter byte + packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height if full else 1)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def raises_clean(exc_type, fn, *needles):
    """`fn()` raises exc_type whose message contains every needle, with no chained traceback."""
    with pytest.raises(exc_type) as info:
        fn()
    err = info.value
    for needle in needles:
        assert needle in str(err), (needle, str(err))
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__), repr(err.__context__)
    return err


# --- smart_resize and the patch layout -------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_smart_resize_matches_reference(seed):
    rng = np.random.default_rng(seed)
    sizes = [(56, 56), (28, 5600), (5600, 28), (1, 200), (3, 7), (2200, 1700), (1_000_000, 10_000)]
    sizes += [tuple(int(v) for v in rng.integers(1, 9000, 2)) for _ in range(300)]
    for h, w in sizes:
        if max(h, w) / min(h, w) > 200:
            continue
        for lo, hi in [(3136, 602112), (28 * 28 * 4, 28 * 28 * 64), (100_000, 200_000)]:
            assert smart_resize(h, w, 28, lo, hi) == hf_qwen.smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)


@pytest.mark.parametrize("w,h", [(2010, 10), (10, 2010), (60_000, 100)])
def test_aspect_ratio_over_200_is_refused(w, h):
    raises_clean(ImageError, lambda: smart_resize(h, w), f"{w}x{h}", "aspect ratio", "200")
    raises_clean(ImageError, lambda: preprocess(Image.new("RGB", (w, h))), f"{w}x{h}", "aspect ratio")


def test_aspect_ratio_of_exactly_200_is_accepted():
    _, grid = preprocess(Image.new("RGB", (5600, 28)))
    assert grid[0] == 1 and grid[1] * grid[2] * 196 <= 602112


def test_merge_windows_are_contiguous():
    """Rows 0-3 are the 2x2 window at the top-left: patches (0,0), (0,1), (1,0), (1,1)."""
    img = noise("RGB", 56, 56)
    pv, grid = preprocess(img)
    assert grid == (1, 4, 4) and num_visual_tokens(grid) == 4
    arr = (np.asarray(img, dtype=np.float64) / 255 - IMAGE_MEAN) / IMAGE_STD
    for row, (i, j) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1), (0, 2)]):
        patch = arr[i * 14 : (i + 1) * 14, j * 14 : (j + 1) * 14].transpose(2, 0, 1)  # (C, 14, 14)
        expect = np.repeat(patch[:, None], 2, axis=1).reshape(-1)  # (C, T, 14, 14) flattened
        np.testing.assert_allclose(pv[row].numpy(), expect, atol=1e-5)


def test_num_visual_tokens():
    assert num_visual_tokens((1, 62, 48)) == 744
    assert num_visual_tokens((1, 4, 4)) == 4


# --- pixel parity -----------------------------------------------------------------


@pytest.mark.parametrize("w,h", [(56, 56), (30, 40), (1700, 2200), (4000, 3000), (2000, 60), (61, 2000)])
def test_parity_sizes_pil(w, h):
    assert_parity(noise("RGB", w, h, seed=w + h))


def test_parity_page_via_path_and_fast(tmp_path):
    page = noise("RGB", 1700, 2200, seed=1)
    path = save(tmp_path, "page.png", page, compress_level=1)
    assert_parity(str(path))
    assert_parity(path, str(path))  # a pathlib.Path
    img = load_image(path)
    start = time.perf_counter()
    preprocess(img)
    assert time.perf_counter() - start < 2.0  # ~40 ms here; generous for loaded CI machines


MODES = ["RGB", "RGBA", "LA", "L", "P", "P+trns", "P+alpha", "L+trns", "RGB+trns", "I;16", "CMYK", "1"]


@pytest.mark.parametrize("mode", MODES)
def test_parity_modes_pil_object(mode):
    # PIL objects go to the processor as they are: transparency composited over white.
    assert_parity(noise(mode, 300, 200))


@pytest.mark.filterwarnings("ignore:Palette images with Transparency:UserWarning")  # Pillow, both sides
@pytest.mark.parametrize("mode", MODES)
def test_parity_modes_path(tmp_path, mode):
    # Strings go through transformers' load_image first: convert("RGB") drops alpha, but a tRNS
    # colour key survives that and is composited by the processor afterwards.
    img = noise(mode, 300, 200)
    path = save(tmp_path, "img.tif", img, "TIFF") if mode == "CMYK" else save(tmp_path, "img.png", img)
    assert_parity(str(path))
    assert_parity(Image.open(path))  # a lazily opened file, passed as an object


def test_alpha_differs_between_routes(tmp_path):
    """The two routes of the original really differ for RGBA, and we follow each."""
    img = noise("RGBA", 64, 64)
    path = save(tmp_path, "a.png", img)
    assert np.array_equal(np.asarray(load_image(str(path))), np.asarray(img)[..., :3])  # alpha dropped
    assert not np.array_equal(np.asarray(load_image(img)), np.asarray(img)[..., :3])  # composited


@pytest.mark.parametrize("mode", ["RGBA", "P+trns", "L"])
def test_parity_base64_and_data_uri(mode):
    b64 = base64.b64encode(encode(noise(mode, 90, 70))).decode()
    assert_parity(b64)
    assert_parity("data:image/png;base64," + b64)
    wrapped = "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))  # MIME line breaks
    assert_parity(wrapped)
    assert_parity({"image": b64}, b64)


def test_parity_jpeg_with_exif_rotation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = save(tmp_path, "rot.jpg", noise("RGB", 320, 200), "JPEG", exif=exif.tobytes(), quality=90)
    upright = assert_parity(str(path))
    assert upright.size == hf_load_image(str(path)).size == (200, 320)  # rotated, as transformers does
    b64 = base64.b64encode(path.read_bytes()).decode()
    assert load_image(b64).size == (200, 320)
    assert load_image("data:image/jpeg;base64," + b64).size == (200, 320)
    # A PIL object is NOT rotated by the original (the processor ignores EXIF); neither are we.
    as_given = assert_parity(Image.open(path))
    assert as_given.size == (320, 200)


@pytest.mark.parametrize(
    "bounds",
    [dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64), dict(min_pixels=100_000, max_pixels=200_000)],
)
@pytest.mark.parametrize("w,h", [(1700, 2200), (30, 40), (500, 90)])
def test_parity_custom_pixel_bounds(w, h, bounds):
    assert_parity(noise("RGB", w, h, seed=3), **bounds)


# --- local HTTP servers -------------------------------------------------------------


class _Server:
    def __init__(self):
        self.hits: list[str] = []
        self.auth: list[str | None] = []
        self.png = encode(noise("RGBA", 120, 90, seed=5))
        self.stop = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send(self, status, body=b"", length=True, **headers):
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                if length:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                outer.hits.append(self.path)
                outer.auth.append(self.headers.get("Authorization"))
                port = self.server.server_address[1]
                if self.path == "/ok.png":
                    self.send(200, outer.png, **{"Content-Type": "image/png"})
                elif self.path == "/big":
                    self.send(200, b"\x89PNG" + b"\0" * 5000)
                elif self.path == "/big-nolength":  # HTTP/1.0: the body ends when the server closes
                    self.send(200, b"\x89PNG" + b"\0" * 5000, length=False)
                elif self.path == "/drip":
                    self.send(200, length=False)
                    try:
                        while not outer.stop.wait(0.1):
                            self.wfile.write(b"x")
                            self.wfile.flush()
                    except OSError:
                        pass
                elif self.path == "/redirect-ok":
                    self.send(302, Location="/ok.png")
                elif self.path == "/redirect-other-host":
                    self.send(302, Location=f"http://127.0.0.2:{port}/ok.png")
                elif self.path == "/redirect-file":
                    self.send(302, Location="file:///etc/hostname")
                else:
                    self.send(404, b"not found")

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server():
    s = _Server()
    yield s
    s.close()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def hanging_server():
    """Accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4)
    stop = threading.Event()
    conns = []

    def serve():
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                conns.append(sock.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/slow.png"
    stop.set()
    t.join()
    for c in conns:
        c.close()
    sock.close()


def test_url_parity(server):
    assert_parity(server.url + "/ok.png")  # transformers fetches it with httpx, we with urllib
    assert_parity(server.url + "/redirect-ok", server.url + "/ok.png")


def test_unreachable_url():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    url = f"http://127.0.0.1:{port}/x.png"
    raises_clean(ImageError, lambda: load_image(url, timeout=2), url, "cannot fetch")


def test_https_to_plain_http_server(server):
    url = server.url.replace("http:", "https:") + "/ok.png"
    raises_clean(ImageError, lambda: load_image(url, timeout=2), url)


def test_url_timeout(hanging_server):
    start = time.monotonic()
    raises_clean(ImageError, lambda: load_image(hanging_server, timeout=0.5), hanging_server, "timed out")
    assert time.monotonic() - start < 5


def test_url_overall_deadline(server):
    url = server.url + "/drip"  # a byte every 0.1 s never trips the socket timeout
    start = time.monotonic()
    raises_clean(ImageError, lambda: load_image(url, timeout=0.8), url, "timed out")
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("path", ["/big", "/big-nolength"])
def test_url_body_over_max_bytes(server, path):
    url = server.url + path
    raises_clean(ImageTooLargeError, lambda: load_image(url, max_bytes=1000), url, "1000")


def test_url_http_error(server):
    url = server.url + "/missing.png"
    raises_clean(ImageError, lambda: load_image(url), url, "404")


def test_private_url_refused(server):
    before = len(server.hits)
    https = server.url.replace("http:", "https:")
    for url in (server.url + "/ok.png", server.url.replace("127.0.0.1", "localhost") + "/ok.png", https):
        raises_clean(ImageError, lambda: load_image(url, allow_private_urls=False), url, "non-public")
    assert len(server.hits) == before  # refused before connecting
    load_image(server.url + "/ok.png", allow_private_urls=True)  # the default allows it


def test_private_redirect_refused(server, monkeypatch):
    # Pretend 127.0.0.1 is public: the first hop passes, the redirect to 127.0.0.2 must not.
    monkeypatch.setattr(mi_fetch, "_is_public_address", lambda ip: ip == "127.0.0.1")
    load_image(server.url + "/redirect-ok", allow_private_urls=False)
    url = server.url + "/redirect-other-host"
    raises_clean(ImageError, lambda: load_image(url, allow_private_urls=False), url, "127.0.0.2", "non-public")


def test_redirect_to_file_refused(server):
    url = server.url + "/redirect-file"
    raises_clean(ImageError, lambda: load_image(url), url, "file")


@pytest.mark.parametrize(
    "ip,public",
    [
        ("8.8.8.8", True), ("2606:4700:4700::1111", True), ("127.0.0.1", False), ("10.1.2.3", False),
        ("172.16.0.1", False), ("192.168.1.1", False), ("169.254.169.254", False), ("100.64.0.1", False),
        ("0.0.0.0", False), ("224.0.0.1", False), ("240.0.0.1", False), ("255.255.255.255", False),
        ("::1", False), ("fe80::1%eth0", False), ("fc00::1", False), ("::ffff:127.0.0.1", False),
        ("ff02::1", False), ("not-an-ip", False),
    ],
)  # fmt: skip
def test_public_address_check(ip, public):
    assert mi_fetch._is_public_address(ip) is public


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/x.png", "file:///etc/passwd", "gopher://127.0.0.1/"])
def test_bad_scheme(url):
    raises_clean(ImageError, lambda: load_image(url), url, "scheme")


@pytest.mark.parametrize("url", ["http://[::1", "http://host:99999/x.png", "http://a:b/"])
def test_malformed_url(url):
    raises_clean(ImageError, lambda: load_image(url), url, "malformed URL")


# --- bad images ---------------------------------------------------------------------


def test_truncated_png(tmp_path):
    data = encode(noise("RGB", 200, 200))
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    raises_clean(ImageError, lambda: load_image(path), str(path), "truncated")
    b64 = base64.b64encode(data[: len(data) // 2]).decode()
    raises_clean(ImageError, lambda: load_image(b64), f"base64 string of {len(b64)} chars", "truncated")


def test_random_bytes(tmp_path):
    junk = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    path = tmp_path / "junk.png"
    path.write_bytes(junk)
    raises_clean(ImageError, lambda: load_image(str(path)), str(path), "not an image")
    raises_clean(ImageError, lambda: load_image(junk), "4096 bytes", "not an image")


def test_text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello, this is not an image\n")
    raises_clean(ImageError, lambda: load_image(str(path)), str(path), "not an image")


def test_missing_file_and_directory(tmp_path):
    missing = str(tmp_path / "nope.png")
    raises_clean(ImageError, lambda: load_image(missing), missing, "no such file")
    raises_clean(ImageError, lambda: load_image(Path(missing)), missing, "no such file")
    raises_clean(ImageError, lambda: load_image("page_1.jpg"), "page_1.jpg", "no such file")
    raises_clean(ImageError, lambda: load_image(str(tmp_path)), str(tmp_path), "not a regular file")


def test_corrupt_base64():
    b64 = base64.b64encode(encode(noise("RGB", 64, 64))).decode()
    bad = b64[:300] + "!@#$" + b64[300:]
    raises_clean(ImageError, lambda: load_image(bad), f"base64 string of {len(bad)} chars", "invalid base64")
    uri = "data:image/png;base64," + bad
    raises_clean(ImageError, lambda: load_image(uri), f"data URI of {len(uri)} chars", "invalid base64")
    raises_clean(ImageError, lambda: load_image("data:image/png,rawbytes"), "data URI", "base64")
    # valid base64, but of something that is not an image
    text = base64.b64encode(b"just some text, long enough to look like a payload" * 8).decode()
    raises_clean(ImageError, lambda: load_image(text), f"base64 string of {len(text)} chars", "not an image")


def test_bad_source_types():
    raises_clean(ImageError, lambda: load_image(12345), "int")
    raises_clean(ImageError, lambda: load_image({"url": "x"}), "'image'")
    with pytest.raises(InputError):
        load_image(noise("RGB", 8, 8), timeout=0)


def test_url_credentials(server):
    url = server.url.replace("http://", "http://user:secret@") + "/missing.png"
    err = raises_clean(ImageError, lambda: load_image(url), "user:***@127.0.0.1", "404")
    assert "secret" not in str(err)
    assert server.auth[-1] == "Basic " + base64.b64encode(b"user:secret").decode()


def test_eps_is_not_decoded(tmp_path):
    path = tmp_path / "x.eps"
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    raises_clean(ImageError, lambda: load_image(path), str(path), "not an image")


def test_decompression_bomb_declared_huge(tmp_path):
    # 900M pixels: over twice Pillow's limit, so Pillow itself refuses at open time.
    path = tmp_path / "bomb.png"
    path.write_bytes(png_declaring(30000, 30000))
    raises_clean(ImageTooLargeError, lambda: load_image(str(path)), str(path), "900000000 pixels")
    # 100M pixels: over the limit but under twice it, where Pillow only warns.
    path.write_bytes(png_declaring(10000, 10000))
    raises_clean(ImageTooLargeError, lambda: load_image(path), str(path), "100000000 pixels")
    b64 = base64.b64encode(path.read_bytes()).decode()
    raises_clean(ImageTooLargeError, lambda: load_image(b64), f"base64 string of {len(b64)} chars")
    # Under Pillow's limit but over ours: refused from the declared size, before decoding.
    path.write_bytes(png_declaring(5000, 5000))
    raises_clean(ImageTooLargeError, lambda: load_image(path, max_pixels=10**6), str(path), "5000x5000")


def test_decompression_bomb_real(tmp_path):
    data = png_declaring(30000, 30000, full=True)  # ~110 KB that would decode to 900M pixels
    assert len(data) < 200_000
    path = tmp_path / "zipbomb.png"
    path.write_bytes(data)
    start = time.monotonic()
    raises_clean(ImageTooLargeError, lambda: load_image(path), str(path))
    assert time.monotonic() - start < 2  # refused from the header, never decoded


def test_our_pixel_and_byte_limits(tmp_path):
    img = noise("RGB", 200, 200)
    path = save(tmp_path, "small.png", img)
    raises_clean(ImageTooLargeError, lambda: load_image(path, max_pixels=10_000), str(path), "40,000")
    raises_clean(ImageTooLargeError, lambda: load_image(img, max_pixels=10_000), "PIL image", "40,000")
    raises_clean(ImageTooLargeError, lambda: load_image(path, max_bytes=1000), str(path), "1000")
    b64 = base64.b64encode(path.read_bytes()).decode()
    raises_clean(ImageTooLargeError, lambda: load_image(b64, max_bytes=1000), "base64 string", "1000")
    assert load_image(path, max_pixels=40_000).size == (200, 200)


def test_pillow_guard_left_on():
    import m0lite.images  # noqa: F401  (importing must not switch Pillow's guard off)

    assert Image.MAX_IMAGE_PIXELS is not None


# --- one parser for image sources; decoding in bounded memory ---------------------------------


def test_parse_image_source_kinds(tmp_path):
    from m0lite.images import parse_image_source

    data = encode(noise("RGB", 32, 32))
    b64 = base64.b64encode(data).decode()
    path = save(tmp_path, "a.png", noise("RGB", 8, 8))
    for allow_paths in (True, False):
        assert parse_image_source("http://example.com/a.png", allow_paths=allow_paths).kind == "url"
        assert parse_image_source(b64, allow_paths=allow_paths).value == data
        assert parse_image_source("data:image/png;base64," + b64, allow_paths=allow_paths).value == data
    assert parse_image_source(str(path), allow_paths=True).kind == "path"
    # A JPEG's base64 starts with "/9j/": it must not be taken for a path.
    jpeg = base64.b64encode(encode(noise("RGB", 16, 16), "JPEG")).decode()
    assert jpeg.startswith("/9j/") and parse_image_source(jpeg, allow_paths=False).kind == "bytes"


@pytest.mark.parametrize("src", ["/etc/passwd", "cat.png", "images/page_1", "~/x.jpg", "C:\\x.png"])
def test_path_where_paths_are_not_read(src):
    from m0lite.images import parse_image_source

    raises_clean(ImageError, lambda: parse_image_source(src, allow_paths=False),
                 "not an http(s) URL, a data URI or valid base64", "looks like a file path")
    raises_clean(ImageError, lambda: load_image(src, allow_paths=False), "looks like a file path")


def test_bomb_message_quotes_the_configured_limit(tmp_path):
    data = png_declaring(30000, 30000)  # over twice Pillow's limit: Pillow refuses in Image.open
    err = raises_clean(ImageTooLargeError, lambda: load_image(data, max_pixels=10**6), "900000000 pixels", "1,000,000")
    assert "178" not in str(err) and "MAX_IMAGE_PIXELS" not in str(err)
    err = raises_clean(ImageTooLargeError, lambda: load_image(data), "89,478,485")


@pytest.mark.parametrize("w,h", [(56, 56), (640, 480), (3000, 20), (1000, 1000), (10, 10)])
def test_resize_for_model_is_idempotent(w, h):
    from m0lite.images.preprocess import resize_for_model

    img = noise("RGB", w, h)
    small = resize_for_model(img)
    assert resize_for_model(small) is small or resize_for_model(small).tobytes() == small.tobytes()
    pv, grid = preprocess(img)
    pv2, grid2 = preprocess(small)
    assert grid == grid2 and torch.equal(pv, pv2)
