"""PDF documents: pages rendered at the model's pixel budget and scored as image documents, exactly; every
bad PDF refused by name; pages streamed in passes; the vision cache keyed on pages' pixels."""

from __future__ import annotations

import base64

import pytest
import torch

pytest.importorskip("pypdfium2")

from m0lite import InputError, Reranker  # noqa: E402
from m0lite.errors import PdfError, PdfTooLargeError  # noqa: E402
from m0lite.images import MAX_PIXELS, MIN_PIXELS, preprocess, smart_resize  # noqa: E402
from m0lite.pdf import PdfFile, parse_pages, render_pages, render_size  # noqa: E402
from m0lite.fixtures.pdfs import picture_pdf, text_pdf  # noqa: E402

QUERY = "quarterly revenue table"
A4, LETTER, SLIDE, TINY, TALL = (595, 842), (612, 792), (960, 540), (20, 30), (300, 20000)


def rendered(data: bytes, **kwargs):
    return [p.image for p in render_pages(data, "test.pdf", **kwargs)]


def test_page_scores_equal_the_rendered_page_as_an_image_document(tiny_reranker):
    data = picture_pdf([A4, SLIDE, LETTER], seed=1)
    images = rendered(data)
    pages = tiny_reranker.rank(QUERY, [{"pdf": data}], pages_as_documents=True)
    alone = tiny_reranker.rank(QUERY, [{"image": im} for im in images])
    assert {(r["page"], r["relevance_score"]) for r in pages} == {(r["index"] + 1, r["relevance_score"]) for r in alone}
    assert all(r["index"] == 0 for r in pages)
    # One page alone: compute_score on the PDF and on its rendered image.
    one = picture_pdf([A4], seed=2)
    assert tiny_reranker.compute_score([QUERY, {"pdf": one}]) == tiny_reranker.compute_score(
        [QUERY, rendered(one)[0]], doc_type="image")


def test_rank_gives_a_pdf_its_best_page_and_lists_best_pages(tiny_reranker):
    data = picture_pdf([A4] * 5, seed=3)
    results = tiny_reranker.rank(QUERY, ["a text", {"pdf": data}, {"pdf": data, "pages": "2-3"}], return_documents=True)
    by_index = {r["index"]: r for r in results}
    pdf, some = by_index[1], by_index[2]
    scores = [p["relevance_score"] for p in pdf["pages"]]
    assert len(pdf["pages"]) == 3 and scores == sorted(scores, reverse=True)
    assert pdf["relevance_score"] == scores[0]
    assert {p["page"] for p in some["pages"]} <= {2, 3} and len(some["pages"]) == 2
    assert some["document"] == {"pdf": data, "pages": "2-3"}
    assert "pages" not in by_index[0]
    pages = tiny_reranker.rank(QUERY, [{"pdf": data}], pages_as_documents=True, top_n=2)
    assert [r["page"] for r in pages] == [p["page"] for p in pdf["pages"][:2]]


def test_sources_path_base64_data_uri(tiny_reranker, tmp_path):
    data = picture_pdf([A4], seed=4)
    path = tmp_path / "report.pdf"
    path.write_bytes(data)
    b64 = base64.b64encode(data).decode()
    docs = [{"pdf": data}, {"pdf": str(path)}, {"pdf": path}, {"pdf": b64}, {"pdf": "data:application/pdf;base64," + b64}]
    scores = tiny_reranker.compute_score([[QUERY, d] for d in docs])
    # The same pixels each time; a pass's numerics depend a little on the rest of its batch.
    assert scores == pytest.approx([scores[0]] * len(docs), rel=1e-6)


@pytest.mark.parametrize("size, expected", [(A4, (644, 924)), (LETTER, (672, 896)), (SLIDE, (1008, 560)),
                                            (TINY, (616, 924)), (TALL, (84, 6328))])
def test_render_size_is_what_smart_resize_keeps(size, expected):
    """A page is drawn at the size smart_resize gives the page pictured at exactly MAX_PIXELS: a fixed point of
    smart_resize (preprocess resizes nothing), within the budget, and no further from the budget's sides than
    smart_resize's rounding (one 28-pixel step) of a render at 10x that resolution."""
    w, h = size
    (image,) = rendered(picture_pdf([size]))
    assert image.size == render_size(w, h) == expected
    width, height = image.size
    assert smart_resize(height, width) == (height, width)  # exact: no resize after the render
    assert MIN_PIXELS <= width * height <= MAX_PIXELS and width % 28 == height % 28 == 0
    scale = (MAX_PIXELS / (w * h)) ** 0.5
    high_h, high_w = smart_resize(round(h * scale * 10), round(w * scale * 10))  # a larger render, resized down
    assert abs(high_h - height) <= 28 and abs(high_w - width) <= 28
    assert preprocess(image)[0].shape[0] == width * height // 14**2
    assert image.getpixel((2, height - 3)) != (255, 255, 255) and image.getpixel((width - 3, 2)) == (255, 255, 255)


def test_render_size_follows_the_reranker_bounds():
    assert render_size(595, 842, max_pixels=256 * 28 * 28) == (364, 532)
    assert render_size(595, 842, min_pixels=MIN_PIXELS, max_pixels=MIN_PIXELS) == (56, 56)


def test_pdf_text_scores_the_page_with_its_text(tiny_reranker):
    data = text_pdf([(595, 842, "Revenue grew (a lot) in Q3"), (595, 842, "Appendix")])
    pages = list(render_pages(data, "t.pdf", with_text=True))
    assert [p.text for p in pages] == ["Revenue grew (a lot) in Q3", "Appendix"]
    with_text = tiny_reranker.rank(QUERY, [{"pdf": data}], pdf_text=True, pages_as_documents=True)
    alone = tiny_reranker.rank(QUERY, [{"image": p.image, "text": p.text} for p in pages])
    assert {(r["page"], r["relevance_score"]) for r in with_text} == {(r["index"] + 1, r["relevance_score"]) for r in alone}
    without = tiny_reranker.rank(QUERY, [{"pdf": data}], pages_as_documents=True)
    assert {r["relevance_score"] for r in without}.isdisjoint({r["relevance_score"] for r in with_text})


def test_pages_stream_in_passes(tiny_ckpt, monkeypatch):
    """Pages are rendered as scoring reaches them, never more than one pass's worth held."""
    rr = Reranker.from_pretrained(tiny_ckpt, dtype=torch.float32, max_batch_tokens=2 * 768)
    assert rr._pages_per_pass() == 2
    events = []
    real_render, real_score = PdfFile.render, rr._score
    monkeypatch.setattr(PdfFile, "render", lambda self, n, **kw: events.append(("render", n)) or real_render(self, n, **kw))
    monkeypatch.setattr(rr, "_score", lambda pairs, **kw: events.append(("score", len(pairs))) or real_score(pairs, **kw))
    data = picture_pdf([A4] * 5, seed=5)
    results = rr.rank(QUERY, [{"pdf": data}], pages_as_documents=True)
    assert sorted(r["page"] for r in results) == [1, 2, 3, 4, 5]
    assert events == [("render", 1), ("render", 2), ("score", 2), ("render", 3), ("render", 4), ("score", 2),
                      ("render", 5), ("score", 1)]


def test_a_pass_lets_its_pages_go_before_the_heap_trim(tiny_ckpt, monkeypatch):
    """Once a pass is scored nothing holds its pages' patches, so the heap trim after it returns them: a long
    PDF costs one pass's pages, not all of them."""
    import weakref

    import m0lite.reranker

    rr = Reranker.from_pretrained(tiny_ckpt, dtype=torch.float32, max_batch_tokens=2 * 768, vision_cache_bytes=0)
    refs, alive = [], []
    real_score = rr._score

    def score(pairs, **kw):
        refs.extend(weakref.ref(d.pixels) for _, d in pairs)
        return real_score(pairs, **kw)

    monkeypatch.setattr(rr, "_score", score)
    monkeypatch.setattr(m0lite.reranker, "trim_heap", lambda: alive.append(sum(r() is not None for r in refs)))
    rr.rank(QUERY, [{"pdf": picture_pdf([A4] * 5, seed=5)}], pages_as_documents=True)
    assert len(refs) == 5 and alive == [0, 0, 0]


def test_a_page_seen_again_is_not_encoded_again(tiny_ckpt):
    rr = Reranker.from_pretrained(tiny_ckpt, dtype=torch.float32)
    data = picture_pdf([A4, LETTER, A4], seed=6)  # pages 1 and 3 hold different pictures
    rr.rank(QUERY, [{"pdf": data}])
    assert (rr.vision_cache.hits, rr.vision_cache.misses, len(rr.vision_cache)) == (0, 3, 3)
    rr.rank("another query", [{"pdf": data, "pages": "1,3"}, {"image": rendered(data)[1]}])
    assert (rr.vision_cache.hits, rr.vision_cache.misses) == (3, 3)


def bad(rr, doc, error, *needles, **kwargs):
    with pytest.raises(error) as info:
        rr.rank(QUERY, ["fine", doc], **kwargs)
    message = str(info.value)
    assert message.startswith("documents[1]"), message
    for needle in needles:
        assert needle in message, message
    return message


def test_bad_pdfs_are_refused_by_name(tiny_reranker, tmp_path):
    good = text_pdf([(595, 842, "one"), (595, 842, "two")])
    bad(tiny_reranker, {"pdf": text_pdf([(595, 842, "x")], encrypt=True)}, PdfError, "encrypted")
    bad(tiny_reranker, {"pdf": text_pdf([])}, PdfError, "has no pages")
    bad(tiny_reranker, {"pdf": b"%PDF-1.4\n" + bytes(range(256)) * 4}, PdfError, "not a valid PDF")
    for cut in (20, len(good) // 2, len(good) - 30):
        bad(tiny_reranker, {"pdf": good[:cut]}, PdfError, "not a valid PDF")
    bad(tiny_reranker, {"pdf": b"\x89PNG\r\n\x1a\n" + b"\0" * 64}, PdfError, "not a PDF")
    bad(tiny_reranker, {"pdf": str(tmp_path / "missing.pdf")}, PdfError, "no such file")
    bad(tiny_reranker, {"pdf": text_pdf([(1e6, 10, None)])}, PdfError, "page 1", "aspect ratio")
    bad(tiny_reranker, {"pdf": good, "pages": "3"}, PdfError, "page 3 asked for, the PDF has 2 pages")
    bad(tiny_reranker, {"pdf": good, "pages": "2-1"}, PdfError, "not a range")
    bad(tiny_reranker, {"pdf": good, "pages": "one"}, PdfError, "not a page number")
    bad(tiny_reranker, {"pdf": good, "password": "x"}, InputError, "keys")
    bad(tiny_reranker, {"pdf": 3}, PdfError, "unsupported PDF source")
    bad(tiny_reranker, {"pdf": "not base64 !"}, PdfError, "no such file")


def test_limits_are_checked_before_rendering(tiny_ckpt, monkeypatch):
    rr = Reranker.from_pretrained(tiny_ckpt, dtype=torch.float32, max_pdf_pages=3, max_pdf_bytes=4000)
    monkeypatch.setattr(PdfFile, "render", lambda *a, **k: pytest.fail("rendered past a limit"))
    five = text_pdf([(595, 842, None)] * 5)
    bad(rr, {"pdf": five}, PdfTooLargeError, "5 pages to render, over the limit of 3", "max_pdf_pages")
    bad(rr, {"pdf": base64.b64encode(picture_pdf([A4] * 4)).decode()}, PdfTooLargeError, "over the limit of 4000")
    assert len(picture_pdf([A4] * 4)) > 4000


def test_decompression_bomb_guard_applies_to_rendered_pixels():
    with PdfFile(text_pdf([(595, 842, None)]), "t.pdf") as pdf:
        with pytest.raises(PdfTooLargeError, match=r"page 1: page of 595x842 points: 644x924 = 595,056 pixels, "
                                                    r"over the limit of 100,000 \(decompression-bomb guard\)"):
            pdf.render(1, max_render_pixels=100_000)


def test_parse_pages():
    assert parse_pages(None, 4, "x") == [1, 2, 3, 4]
    assert parse_pages("1-20", 4, "x") == [1, 2, 3, 4]  # a range's end is cut to the last page
    assert parse_pages("3, 1,2-3", 4, "x") == [3, 1, 2]
    assert parse_pages("2-", 4, "x") == [2, 3, 4]
    assert parse_pages(2, 4, "x") == [2]
    for spec in ("0", "", "5", "a-b", "1-2-3", True, [1]):
        with pytest.raises(PdfError):
            parse_pages(spec, 4, "x")
