import asyncio
import threading
import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from cifar10_resnet50 import checkpoint
from cifar10_resnet50.evaluation import evaluate
from cifar10_resnet50.serving import batching, inference, serve
from cifar10_resnet50.serving.batching import ApiError, MicroBatcher
from cifar10_resnet50.serving.settings import ServeConfig
from corpus import corpus

SETTINGS = ServeConfig(max_body_mb=1)


def wait_ready(client, seconds=60):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError("server never became ready")


@pytest.fixture(scope="module")
def client(tiny_checkpoint):
    app = serve.create_app(lambda: inference.load(tiny_checkpoint, batch_size=32), SETTINGS)
    with TestClient(app) as c:
        wait_ready(c)
        yield c


@pytest.mark.parametrize("name", sorted(corpus()))
def test_corpus_through_the_server_gets_the_right_status(client, name):
    payload, kind = corpus()[name]
    r = client.post("/predict", files={"file": (name, payload, "application/octet-stream")})
    expected = 200 if kind is None else batching.STATUS_FOR_KIND[kind]
    assert r.status_code == expected, r.text
    if kind is None:
        top = r.json()["predictions"][0]["top"]
        assert len(top) == 5 and abs(sum(t["probability"] for t in top) - 1) < 0.5
    else:
        err = r.json()["error"]
        assert err["status"] == expected and err["code"] == kind and name in err["message"]
    assert client.get("/healthz").status_code == 200


def test_raw_body_and_several_files_in_order(client, test_pngs):
    paths, _ = test_pngs
    raw = client.post(
        "/predict", content=paths[0].read_bytes(), headers={"content-type": "image/png"}
    )
    assert raw.status_code == 200 and raw.json()["predictions"][0]["filename"] == "body"
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in paths[:5]]
    many = client.post("/predict?top_k=2", files=files)
    assert many.status_code == 200
    preds = many.json()["predictions"]
    assert [p["filename"] for p in preds] == [p.name for p in paths[:5]]
    assert all(len(p["top"]) == 2 for p in preds)
    assert raw.json()["predictions"][0]["top"][0]["label"] == preds[0]["top"][0]["label"]


def test_limits_and_content_types(client):
    big = client.post(
        "/predict", content=b"\0" * (2 * 1024 * 1024), headers={"content-type": "image/png"}
    )
    assert big.status_code == 413 and big.json()["error"]["code"] == "too_large"
    text = client.post("/predict", content=b"hello", headers={"content-type": "text/plain"})
    assert text.status_code == 415
    form = client.post("/predict", data={"note": "urlencoded"})
    assert form.status_code == 415
    empty_form = client.post("/predict", files={"note": (None, "a text field, no file")})
    assert empty_form.status_code == 400 and empty_form.json()["error"]["code"] == "no_file"
    broken = client.post(
        "/predict",
        content=b"--x\r\nbroken",
        headers={"content-type": "multipart/form-data; boundary=x"},
    )
    assert broken.status_code in (400, 415, 422)
    assert client.get("/healthz").json() == {"status": "ok"}


def test_framework_errors_use_the_same_json_error_shape(client):
    png = corpus()["photo.jpg"][0]
    cases = [
        (client.post("/predict?top_k=abc", content=png), 422, "invalid_request", "top_k"),
        (client.get("/nope"), 404, "not_found", "Not Found"),
        (client.get("/predict"), 405, "method_not_allowed", "Method Not Allowed"),
    ]
    for response, status, code, fragment in cases:
        body = response.json()["error"]
        assert (response.status_code, body["status"], body["code"]) == (status, status, code)
        assert fragment in body["message"]


def test_labels_readyz_metrics_openapi_and_page(client):
    assert client.get("/labels").json()["labels"][9] == "truck"
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["backend"] == "torch"
    client.post(
        "/predict", content=corpus()["photo.jpg"][0], headers={"content-type": "image/jpeg"}
    )
    metrics = client.get("/metrics").text
    assert 'cifar10_requests_total{endpoint="/predict",status="200"}' in metrics
    assert (
        "cifar10_batch_size_images_bucket" in metrics
        and "cifar10_request_latency_seconds" in metrics
    )
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/predict", "/healthz", "/readyz", "/metrics", "/labels"} <= set(paths)
    page = client.get("/")
    assert page.status_code == 200 and 'id="file"' in page.text


def test_not_ready_until_the_model_is_loaded(tiny_checkpoint):
    release = threading.Event()

    def slow_load():
        release.wait(30)
        return inference.load(tiny_checkpoint)

    with TestClient(serve.create_app(slow_load, SETTINGS)) as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").status_code == 503
        r = c.post(
            "/predict", content=corpus()["photo.jpg"][0], headers={"content-type": "image/jpeg"}
        )
        assert r.status_code == 503 and r.headers["retry-after"]
        release.set()
        wait_ready(c)
        r = c.post(
            "/predict", content=corpus()["photo.jpg"][0], headers={"content-type": "image/jpeg"}
        )
        assert r.status_code == 200


def test_failed_model_load_is_reported_not_fatal(tmp_path):
    def broken():
        raise ValueError("no such model")

    with TestClient(serve.create_app(broken, SETTINGS)) as c:
        time.sleep(0.2)
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and "no such model" in r.json()["error"]["message"]


# ---------------------------------------------------------------- the micro-batcher itself


def _run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_are_batched_together_and_get_their_own_rows():
    sizes = []

    def predict(x):  # echo each image's first pixel, so routing mistakes show
        time.sleep(0.02)
        return np.tile(x[:, :1, 0, 0].astype(np.float32), (1, 10))

    async def main():
        b = MicroBatcher(predict, ServeConfig(max_batch=16, max_wait_ms=20), sizes.append)
        b.start()
        outs = await asyncio.gather(
            *(b.submit(np.full((1 + i % 2, 32, 32, 3), i, np.uint8)) for i in range(12))
        )
        await b.stop()
        return outs

    outs = _run(main())
    for i, out in enumerate(outs):
        assert out.shape == (1 + i % 2, 10) and (out == i).all()
    assert max(sizes) > 2 and sum(sizes) == 18  # several requests shared a model call


def test_full_queue_is_503_and_slow_inference_is_504():
    release = threading.Event()

    def stuck(x):
        release.wait(5)
        return np.zeros((len(x), 10), np.float32)

    async def main():
        b = MicroBatcher(
            stuck, ServeConfig(queue_images=2, timeout_s=0.2, max_wait_ms=1), lambda n: None
        )
        b.start()
        first = asyncio.create_task(b.submit(np.zeros((2, 32, 32, 3), np.uint8)))
        await asyncio.sleep(0.05)
        with pytest.raises(ApiError) as full:
            await b.submit(np.zeros((1, 32, 32, 3), np.uint8))
        assert full.value.status == 503 and full.value.headers["Retry-After"]
        with pytest.raises(ApiError) as late:
            await first
        assert late.value.status == 504
        release.set()
        await b.stop()

    _run(main())


def test_server_backends_and_evaluate_agree(tiny_checkpoint, test_pngs, tmp_path):
    from cifar10_resnet50.serving import export

    onnx_path = tmp_path / "m.onnx"
    export._write_onnx(
        export.WithSoftmax(checkpoint.load_model(tiny_checkpoint)[0]),
        {**checkpoint.load(tiny_checkpoint)["model_meta"], "precision": "fp32"},
        onnx_path,
    )
    paths, tensors = test_pngs
    model, meta = checkpoint.load_model(tiny_checkpoint)
    logits = evaluate.predict_logits(
        model, tensors, batch_size=50, device=torch.device("cpu"), amp_dtype=None
    )
    expected = [meta["classes"][i] for i in logits.argmax(1).tolist()]
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]
    for path in (tiny_checkpoint, onnx_path):
        app = serve.create_app(lambda path=path: inference.load(path), SETTINGS)
        with TestClient(app) as c:
            wait_ready(c)
            got = [
                p["top"][0]["label"] for p in c.post("/predict", files=files).json()["predictions"]
            ]
        assert got == expected, path.suffix


def test_only_non_loopback_hosts_get_the_no_authentication_warning():
    assert serve.exposure_warning("127.0.0.1") is None
    assert serve.exposure_warning("localhost") is None
    assert serve.exposure_warning("::1") is None
    assert "no authentication" in serve.exposure_warning("0.0.0.0")


def test_decoding_is_granted_in_arrival_order_so_a_good_request_never_waits_out_a_hostile_one(
    monkeypatch,
):
    """One decode thread. A request of 5 hostile images is decoding its first (held until we
    release it) when a good request arrives: the good image is decoded before the hostile
    request's third, so it waits for what was queued before it, never for the whole hostile
    request (the order is the promise; how long that takes depends on the machine)."""
    from cifar10_resnet50 import images

    started, first_held = [], threading.Event()

    def decode(data, name, **limits):
        started.append(name)
        if name == "h0":
            first_held.wait(30)  # a guard against a hang only
        return name

    monkeypatch.setattr(images, "decode", decode)
    monkeypatch.setattr(images, "header_pixels", lambda data, limit: 1)
    decoder = batching.Decoder(ServeConfig(decode_workers=1))

    async def main():
        deadline = batching.Deadline(60)
        hostile = asyncio.create_task(
            decoder.decode([(f"h{i}", b"") for i in range(5)], 32, deadline)
        )
        while "h0" not in started:
            await asyncio.sleep(0.01)
        good = asyncio.create_task(decoder.decode([("g", b"")], 32, deadline))
        await asyncio.sleep(0.05)  # the good request queues for the thread
        first_held.set()
        return await hostile, await good

    assert _run(main()) == (["h0", "h1", "h2", "h3", "h4"], ["g"])
    decoder.stop()
    assert started.index("g") < started.index("h2"), started
