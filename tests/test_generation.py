"""chatbot.generation: local streaming on the tiny random Llama, adapters, int8, the OpenAI client."""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from chatbot.generation import Generator, LocalGenerator, OpenAIGenerator, make_generator
from chatbot.models import load_model, resolve_device, resolve_dtype
from chatbot.settings import ModelSettings, Settings
from knowledge_base.errors import ModelLoadError, NotFoundError, SupportBotError

SYSTEM = "You are the support assistant of an online store."
MESSAGES = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "How long does shipping take?"},
]


def _worker_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "supportbot-generate"]


@pytest.fixture
def gen(tiny_settings: Settings) -> LocalGenerator:
    return LocalGenerator(tiny_settings.model, tiny_settings.data_dir)


def _on_lm_head(gen: LocalGenerator, hook: Callable[[int, torch.Tensor], torch.Tensor | None]) -> Any:
    """Call ``hook(call_number, logits)`` on every forward of the output layer (one per new token)."""
    calls = [0]

    def wrapper(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        calls[0] += 1
        return hook(calls[0], output)

    handle = gen.loaded.model.get_output_embeddings().register_forward_hook(wrapper)
    return handle, calls


# -- LocalGenerator --------------------------------------------------------------------------------


def test_stream_joins_to_generate_and_matches_plain_transformers(gen: LocalGenerator) -> None:
    chunks = list(gen.stream(MESSAGES))
    assert len(chunks) > 1 and all(chunks)
    text = gen.generate(MESSAGES)
    assert "".join(chunks) == text

    rendered = gen.tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    ids = gen.tokenizer(rendered, add_special_tokens=False, return_tensors="pt")["input_ids"]
    model: Any = gen.loaded.model
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, repetition_penalty=1.1
    )
    assert gen.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True) == text
    assert gen.name == gen.settings.model and gen.adapter is None
    assert gen.count_tokens("How long does shipping take?") == len(
        gen.tokenizer("How long does shipping take?", add_special_tokens=False)["input_ids"]
    )


def test_stops_at_max_new_tokens(gen: LocalGenerator) -> None:
    handle, calls = _on_lm_head(gen, lambda n, out: None)
    try:
        gen.generate(MESSAGES)
        assert calls[0] == 12  # settings.max_new_tokens
        calls[0] = 0
        gen.generate(MESSAGES, max_new_tokens=5)
        assert calls[0] == 5
    finally:
        handle.remove()


def test_stops_at_eos(gen: LocalGenerator) -> None:
    eos = gen.tokenizer.eos_token_id

    def force_eos(n: int, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        logits[..., eos] = 1e4
        return logits

    handle, calls = _on_lm_head(gen, force_eos)
    try:
        assert gen.generate(MESSAGES, max_new_tokens=50) == ""
        assert calls[0] == 1
    finally:
        handle.remove()


def _prompts_seen(gen: LocalGenerator) -> tuple[Any, list[list[int]]]:
    seen: list[list[int]] = []

    def hook(module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids")
        if ids is not None and not seen:
            seen.append(ids[0].tolist())

    return gen.loaded.model.register_forward_pre_hook(hook, with_kwargs=True), seen


def test_long_history_is_trimmed_to_the_context_window(tiny_settings: Settings) -> None:
    model = dataclasses.replace(tiny_settings.model, context_window=256, max_new_tokens=12)
    gen = LocalGenerator(model, tiny_settings.data_dir)
    history = []
    for i in range(30):
        history.append({"role": "user", "content": f"Old question number {i} about my order and its delivery?"})
        history.append({"role": "assistant", "content": f"Old answer number {i}: it ships in two business days."})
    question = "Customer question: can I return shoes?"
    messages = [{"role": "system", "content": SYSTEM}, *history, {"role": "user", "content": question}]
    handle, seen = _prompts_seen(gen)
    try:
        gen.generate(messages)
    finally:
        handle.remove()
    prompt = str(gen.tokenizer.decode(seen[0]))
    assert len(seen[0]) <= 256 - 12
    assert SYSTEM in prompt and question in prompt
    assert "number 0 " not in prompt and "number 29 " in prompt
    # The kept history starts with a user turn (alternating templates need that).
    assert prompt.index("<|im_start|>user") < prompt.index("<|im_start|>assistant")


def test_oversized_last_message_is_cut_in_its_context_part(tiny_settings: Settings) -> None:
    model = dataclasses.replace(tiny_settings.model, context_window=256, max_new_tokens=12)
    gen = LocalGenerator(model, tiny_settings.data_dir)
    entries = "\n\n".join(f"[{i}] Q: How long does shipping take to zone {i}?\nA: {i + 2} days." for i in range(1, 80))
    user = f"FAQ entries:\n{entries}\n\nCustomer question: can I return shoes?"
    handle, seen = _prompts_seen(gen)
    try:
        gen.generate([{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}])
    finally:
        handle.remove()
    prompt = str(gen.tokenizer.decode(seen[0]))
    assert len(seen[0]) <= 256 - 12
    # Best entries (first) and the whole question stay; the tail of the context goes.
    assert "FAQ entries:\n[1] Q:" in prompt and "zone 79" not in prompt
    assert "Customer question: can I return shoes?<|im_end|>" in prompt

    # No FAQ layout: the message keeps its end. A huge system prompt keeps its start. No crash, even
    # with max_new_tokens above the window.
    cases = [
        ([{"role": "user", "content": "please help " * 2000 + "where is my parcel?"}], 4),
        ([{"role": "system", "content": "be kind " * 2000}, {"role": "user", "content": "hi"}], 1000),
    ]
    prompts = []
    for messages, max_new_tokens in cases:
        handle, seen = _prompts_seen(gen)
        try:
            assert isinstance(gen.generate(messages, max_new_tokens=max_new_tokens), str)
        finally:
            handle.remove()
        assert len(seen[0]) <= 256 - min(max_new_tokens, 192)
        prompts.append(str(gen.tokenizer.decode(seen[0])))
    assert prompts[0].endswith("please help where is my parcel?<|im_end|>\n<|im_start|>assistant\n")
    assert prompts[1].startswith("<|im_start|>system\nbe kind be kind")
    assert "<|im_start|>user\nhi<|im_end|>" in prompts[1]


def test_error_in_generation_reaches_the_consumer(gen: LocalGenerator) -> None:
    def boom(n: int, logits: torch.Tensor) -> None:
        if n == 3:
            raise RuntimeError("boom in forward")

    handle, _ = _on_lm_head(gen, boom)
    chunks: list[str] = []
    try:
        with pytest.raises(SupportBotError, match="boom in forward") as info:
            for chunk in gen.stream(MESSAGES):
                chunks.append(chunk)
    finally:
        handle.remove()
    assert isinstance(info.value.__cause__, RuntimeError)
    assert len(chunks) == 2  # what was generated before the failure still arrived
    assert not _worker_threads()
    assert gen.generate(MESSAGES)  # the lock was released


def test_closing_a_stream_early_stops_its_thread(gen: LocalGenerator) -> None:
    def slow(n: int, logits: torch.Tensor) -> None:
        time.sleep(0.01)

    handle, calls = _on_lm_head(gen, slow)
    try:
        stream: Any = gen.stream(MESSAGES, max_new_tokens=500)
        assert next(stream)
        stream.close()
        assert not _worker_threads()
        done = calls[0]
        assert done < 100
        time.sleep(0.1)
        assert calls[0] == done

        dropped = gen.stream(MESSAGES, max_new_tokens=500)
        next(dropped)
        del dropped  # an abandoned generator is closed when collected
        assert not _worker_threads()
        assert calls[0] < done + 100
    finally:
        handle.remove()
    assert gen.generate(MESSAGES, max_new_tokens=3)  # the lock was released


def test_one_generation_at_a_time(gen: LocalGenerator) -> None:
    running, peak = [0], [0]
    lock = threading.Lock()

    def track(module: torch.nn.Module, args: Any) -> None:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.002)
        with lock:
            running[0] -= 1

    handle = gen.loaded.model.register_forward_pre_hook(track)
    results: list[str] = []
    try:
        threads = [threading.Thread(target=lambda: results.append(gen.generate(MESSAGES))) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        handle.remove()
    assert len(results) == 3 and len(set(results)) == 1
    assert peak[0] == 1


# -- adapters --------------------------------------------------------------------------------------


def _make_adapter(model_dir: Path, target: Path, *, rank: int = 4, seed: int = 0) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=rank, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(str(target))
    return target


def test_adapter_swap_changes_output_and_none_restores_it(
    gen: LocalGenerator, tiny_model_dir: Path, tmp_path: Path
) -> None:
    adapter = _make_adapter(tiny_model_dir, tmp_path / "faq-v1")
    before = gen.generate(MESSAGES)
    gen.set_adapter(adapter, "v1")
    assert gen.adapter == "v1"
    with_adapter = gen.generate(MESSAGES)
    assert with_adapter != before
    gen.set_adapter(None)
    assert gen.adapter is None
    assert gen.generate(MESSAGES) == before

    gen.set_adapter(adapter)  # no version: the folder name
    assert gen.adapter == "faq-v1"
    assert gen.generate(MESSAGES) == with_adapter
    second = _make_adapter(tiny_model_dir, tmp_path / "faq-v2", seed=1)
    gen.set_adapter(second, "v2")
    assert gen.generate(MESSAGES) not in (before, with_adapter)
    gen.set_adapter(None)
    assert gen.generate(MESSAGES) == before


def test_broken_adapter_keeps_the_previous_one(gen: LocalGenerator, tiny_model_dir: Path, tmp_path: Path) -> None:
    before = gen.generate(MESSAGES)
    good = _make_adapter(tiny_model_dir, tmp_path / "good")
    gen.set_adapter(good, "good")
    with_adapter = gen.generate(MESSAGES)

    with pytest.raises(NotFoundError, match=r"adapter_config\.json"):
        gen.set_adapter(tmp_path / "missing")
    # rank-8 weights under a rank-4 config: peft fails halfway through loading
    broken = _make_adapter(tiny_model_dir, tmp_path / "broken", rank=8)
    (broken / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    with pytest.raises(SupportBotError, match="cannot load the LoRA adapter") as info:
        gen.set_adapter(broken, "broken")
    assert "now serving adapter good" in info.value.fix
    assert gen.adapter == "good"
    assert gen.generate(MESSAGES) == with_adapter
    gen.set_adapter(None)
    assert gen.generate(MESSAGES) == before  # the failed load left nothing behind in the base


def test_int8_on_cpu_quantizes_and_still_takes_adapters(tiny_settings: Settings, tmp_path: Path) -> None:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    settings = dataclasses.replace(tiny_settings.model, cpu_speedup="int8")
    gen = LocalGenerator(settings, tiny_settings.data_dir)
    assert any(isinstance(m, DynamicLinear) for m in gen.loaded.model.modules())
    assert isinstance(gen.generate(MESSAGES), str)
    adapter = _make_adapter(Path(settings.model), tmp_path / "int8-adapter")
    gen.set_adapter(adapter, "v1")
    assert any(isinstance(m, DynamicLinear) for m in gen.loaded.model.modules())
    assert gen.adapter == "v1" and isinstance(gen.generate(MESSAGES), str)
    gen.set_adapter(None)
    assert gen.adapter is None


def test_int8_is_ignored_off_the_cpu(tiny_settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    plain = load_model(tiny_settings.model, tiny_settings.data_dir)
    on_gpu = dataclasses.replace(plain, device=torch.device("cuda"), dtype=torch.bfloat16)
    settings = dataclasses.replace(tiny_settings.model, cpu_speedup="int8")
    with caplog.at_level(logging.INFO, logger="chatbot.generation"):
        gen = LocalGenerator(settings, tiny_settings.data_dir, loaded=on_gpu)
    assert gen.loaded.model is plain.model
    assert "cpu_speedup=int8 ignored" in caplog.text


# -- device and dtype ------------------------------------------------------------------------------


def test_device_and_dtype_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    device = resolve_device("auto")
    assert device.type == "cuda" and resolve_dtype("auto", device) == torch.bfloat16
    # GPUs before Ampere have no bf16: float16 (fine-tuning then scales its loss).
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert resolve_dtype("auto", device) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    device = resolve_device("auto")
    assert device.type == "cpu" and resolve_dtype("auto", device) == torch.float32
    with pytest.raises(ModelLoadError) as info:
        resolve_device("cuda")
    assert info.value.fix


def test_on_a_gpu_the_weights_load_straight_onto_it(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """``device_map`` names this process's GPU in from_pretrained: no host copy, no ``.to`` afterwards."""
    import transformers

    calls: list[dict[str, Any]] = []

    class Loaded:
        def to(self, *args: Any, **kwargs: Any) -> None:
            raise AssertionError("moved after loading")

        def eval(self) -> Loaded:
            return self

    def from_pretrained(path: str, **kwargs: Any) -> Loaded:
        calls.append(kwargs)
        return Loaded()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)  # as init_distributed sets it for rank 1
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    loaded = load_model(ModelSettings(model=str(tiny_model_dir), device="cuda"), tmp_path, for_training=True)
    assert calls == [{"dtype": torch.bfloat16, "device_map": torch.device("cuda", 1)}]
    assert loaded.device.type == "cuda" and loaded.dtype == torch.bfloat16


# -- OpenAI-compatible server ----------------------------------------------------------------------


def _event(content: str | None, role: str | None = None) -> bytes:
    delta = {k: v for k, v in (("role", role), ("content", content)) if v is not None}
    return f"data: {json.dumps({'choices': [{'index': 0, 'delta': delta}]})}\n\n".encode()


class _StubHandler(BaseHTTPRequestHandler):
    server: _StubServer

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        self.server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
        if self.path.startswith("/broken/"):
            payload = b'{"error": {"message": "model crashed"}}'
            self.send_response(500)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        if self.path.startswith("/slow/"):
            time.sleep(1.0)
        try:
            self._send_events()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (the timeout test)

    def _send_events(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for event in (
            _event(None, role="assistant"),
            b": keep-alive\n\n",
            _event("Hello"),
            _event(" there"),
            _event("!"),
        ):
            self.wfile.write(event)
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.write(_event(" never sent"))

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _StubServer(ThreadingHTTPServer):
    daemon_threads = True
    requests: list[dict[str, Any]]
    url: str


@pytest.fixture
def stub() -> Iterator[_StubServer]:
    """An OpenAI-style SSE server on a free local port; ``stub.url`` is its root."""
    server = _StubServer(("127.0.0.1", 0), _StubHandler)
    server.requests = []
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _openai(base_url: str, **changes: Any) -> OpenAIGenerator:
    settings = ModelSettings(
        backend="openai", openai_base_url=base_url, openai_model="faq-model", openai_api_key="sk-test", **changes
    )
    return OpenAIGenerator(settings, client=httpx.Client(trust_env=False))


def test_openai_streams_text_with_key_and_body(stub: _StubServer) -> None:
    gen = _openai(stub.url + "/v1/", temperature=0.3, max_new_tokens=50)
    assert list(gen.stream(MESSAGES, max_new_tokens=20)) == ["Hello", " there", "!"]
    assert gen.generate(MESSAGES) == "Hello there!"
    assert gen.name == "faq-model" and gen.adapter is None
    first, second = stub.requests
    assert first["path"] == "/v1/chat/completions"
    assert first["headers"]["Authorization"] == "Bearer sk-test"
    assert first["body"] == {
        "model": "faq-model",
        "messages": MESSAGES,
        "stream": True,
        "max_tokens": 20,
        "temperature": 0.3,
        "top_p": 0.9,
    }
    assert second["body"]["max_tokens"] == 50
    assert gen.count_tokens("x" * 40) == 11
    with pytest.raises(SupportBotError, match="cannot switch LoRA adapters"):
        gen.set_adapter(Path("anything"))


def test_openai_without_key_or_model(stub: _StubServer) -> None:
    settings = ModelSettings(backend="openai", openai_base_url=stub.url + "/v1")
    gen = make_generator(settings, Path("unused"))
    assert isinstance(gen, OpenAIGenerator) and gen.name == "openai"
    try:
        assert gen.generate(MESSAGES) == "Hello there!"
    finally:
        gen.close()
    request = stub.requests[0]
    assert "Authorization" not in request["headers"] and "model" not in request["body"]


def test_openai_http_error_names_url_and_status(stub: _StubServer) -> None:
    gen = _openai(stub.url + "/broken/v1")
    with pytest.raises(SupportBotError) as info:
        gen.generate(MESSAGES)
    assert f"{stub.url}/broken/v1/chat/completions" in info.value.message
    assert "500" in info.value.message and "model crashed" in info.value.message
    assert info.value.fix


def test_openai_timeout(stub: _StubServer) -> None:
    gen = _openai(stub.url + "/slow/v1", request_timeout_s=0.2)
    with pytest.raises(SupportBotError, match=r"did not answer within 0\.2 s") as info:
        gen.generate(MESSAGES)
    assert "request_timeout_s" in info.value.fix


def test_openai_refused_connection() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    gen = _openai(f"http://127.0.0.1:{port}/v1")
    with pytest.raises(SupportBotError) as info:
        gen.generate(MESSAGES)
    assert f"http://127.0.0.1:{port}/v1/chat/completions" in info.value.message
    assert "openai_base_url" in info.value.fix


def test_generator_base_defaults() -> None:
    class Echo(Generator):
        name = "echo"

        def stream(self, messages: list[dict[str, str]], *, max_new_tokens: int | None = None) -> Iterator[str]:
            yield from messages[-1]["content"].split(" ")

    echo = Echo()
    assert echo.generate([{"role": "user", "content": "a b c"}]) == "abc"
    assert echo.count_tokens("abcdefgh") == 3
    assert echo.adapter is None
    with pytest.raises(SupportBotError):
        echo.set_adapter(None)


# -- the real bundled model ------------------------------------------------------------------------


@pytest.mark.slow
def test_bundled_smollm2_streams_and_stops_at_eos(settings: Settings) -> None:
    model = dataclasses.replace(settings.model, max_new_tokens=96)
    gen = make_generator(model, settings.data_dir)
    assert isinstance(gen, LocalGenerator) and gen.name == "smollm2-135m-instruct"
    messages = [
        {"role": "system", "content": "You are a helpful assistant. Answer in one short sentence."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    steps: list[int] = []
    handle = gen.loaded.model.register_forward_hook(lambda module, args, out: steps.append(1))
    try:
        chunks = list(gen.stream(messages))
    finally:
        handle.remove()
    text = "".join(chunks)
    assert chunks and "Paris" in text
    assert "<|im_end|>" not in text
    assert len(steps) < 96  # fewer steps than allowed: it stopped at <|im_end|>
