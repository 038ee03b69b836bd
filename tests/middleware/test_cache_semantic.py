"""The semantic cache: what is compared, the guard, the embedders, the vector indexes (memory
and pgvector on the real PostgreSQL), and paraphrases answered through a real gateway with the
official SDKs."""
from __future__ import annotations

import asyncio
import math
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import orjson
import psycopg
import pytest

from gateway.app import create_app
from gateway.config import ConfigError
from middleware.cache.semantic import (
    Candidate,
    EmbedderError,
    HttpEmbedder,
    LocalEmbedder,
    MemoryVectorIndex,
    OpenAIEmbedder,
    PgVectorIndex,
    SemanticCache,
    VectorIndexError,
    guard_of,
    guards_agree,
    semantic_query,
)
from tests.harness import (
    TEST_KEY,
    ThreadedServer,
    free_port,
    mock_config,
    read_body,
    write_config,
)
from tests.mock_providers import MockProviderServer
from tests.tcp_proxy import TcpProxy

PG_DSN = "host=127.0.0.1 port=5432 user=root dbname=test"
OTHER_KEY = "sk-sg-another-project-key-0123456789abcdef"


def chat(text: str, *, system: str | None = None, **extra: Any) -> dict[str, Any]:
    messages = [{"role": "system", "content": system}] if system else []
    return {"model": "m", "temperature": 0,
            "messages": [*messages, {"role": "user", "content": text}], **extra}


def query(body: dict[str, Any], scope: str = "project:a", model: str = "m",
          operation: str = "openai.chat", **options: Any) -> Any:
    return semantic_query(scope, model, operation, body, **options)


def unit(values: list[float]) -> list[float]:
    norm = math.sqrt(sum(v * v for v in values))
    return [v / norm for v in values]


# -- what is compared ----------------------------------------------------------------------------

def test_the_partition_holds_everything_but_the_embedded_window() -> None:
    base = query(chat("What is the capital of France?", system="Be brief."))
    assert base is not None and base.text == "What is the capital of France?"
    same_context = query(chat("Which city is France's capital?", system="Be brief.",
                              user="someone", stream=True))
    assert same_context is not None and same_context.partition == base.partition
    for other in (query(chat("What is the capital of France?", system="Be verbose.")),
                  query(chat("What is the capital of France?", system="Be brief.",
                             temperature=0.5)),
                  query(chat("What is the capital of France?", system="Be brief.",
                             tools=[{"type": "function", "function": {"name": "f"}}])),
                  query(chat("What is the capital of France?", system="Be brief."),
                        scope="project:b"),
                  query(chat("What is the capital of France?", system="Be brief."), model="n"),
                  query(chat("What is the capital of France?", system="Be brief."),
                        namespace="ns")):
        assert other is not None and other.partition != base.partition


def test_numbers_are_read_as_the_exact_key_reads_them_and_the_embedder_partitions() -> None:
    zero = semantic_query("project:a", "m", "openai.chat", {**chat("hi"), "temperature": 0})
    zero_point = semantic_query("project:a", "m", "openai.chat",
                                {**chat("hi"), "temperature": 0.0})
    assert zero is not None and zero_point is not None
    assert zero.partition == zero_point.partition  # (a lost hit, it was)
    other_model = semantic_query("project:a", "m", "openai.chat", chat("hi"),
                                 embedder="openai:text-embedding-3-small")
    assert other_model is not None
    assert other_model.partition != semantic_query("project:a", "m", "openai.chat", chat("hi"),
                                                   embedder="all-MiniLM-L6-v2").partition


def test_the_speaker_name_and_the_forwarded_headers_are_part_of_the_partition() -> None:
    """`name` says who is speaking (multi-party chats, personas): the answer to alice is not
    bob's, however alike their words. The headers the Anthropic adapter sends on (a beta, a
    version) change the answer too."""
    def said_by(name: str | None) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "user", "content": "Hello, who am I?"}
        if name is not None:
            message["name"] = name
        return {"messages": [{"role": "system", "content": "Greet the user by name."},
                             message]}
    alice, bob, nobody = (query(said_by(name)) for name in ("alice", "bob", None))
    assert alice is not None and bob is not None and nobody is not None
    assert alice.text == bob.text == nobody.text
    assert len({alice.partition, bob.partition, nobody.partition}) == 3
    body = chat("What is the capital of France?")
    plain = semantic_query("project:a", "m", "anthropic.messages", body)
    beta = semantic_query("project:a", "m", "anthropic.messages", body,
                          headers=(("anthropic-beta", "interleaved-thinking-2025-05-14"),))
    assert plain is not None and beta is not None and plain.partition != beta.partition


def test_the_window_is_the_recent_plain_text_turns_and_older_ones_must_match() -> None:
    turns = [{"role": "user", "content": f"turn {i}"} if i % 2 == 0 else
             {"role": "assistant", "content": f"answer {i}"} for i in range(7)]
    # By default the window is the last message: every turn before it must match exactly
    # (embedded with them, a short new question barely moved the vector: "Translate it
    # into German" after a long policy answered "Give it a short title").
    found = query({"messages": turns})
    assert found is not None and found.text == "turn 6"
    earlier = [dict(t) for t in turns]
    earlier[4]["content"] = "turn four, put otherwise"
    other = query({"messages": earlier})
    assert other is not None and other.partition != found.partition
    wide = query({"messages": turns}, window_messages=4, window_chars=2000)
    assert wide is not None
    assert wide.text == "assistant: answer 3\nuser: turn 4\nassistant: answer 5\nuser: turn 6"
    changed_history = [dict(t) for t in turns]
    changed_history[0]["content"] = "something else"
    other = query({"messages": changed_history}, window_messages=4, window_chars=2000)
    assert other is not None and other.partition != wide.partition
    # Two messages when the window is two; text parts count as plain text.
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello"},
                                          {"type": "text", "text": "there"}]}]
    assert query({"messages": parts}).text == "hello\nthere"  # type: ignore[union-attr]
    assert query({"messages": turns}, window_messages=2).text == \
        "assistant: answer 5\nuser: turn 6"  # type: ignore[union-attr]


@pytest.mark.parametrize("body", [
    chat("x" * 1001),  # longer than the window
    {"messages": [{"role": "user", "content": [{"type": "image_url",
                                                "image_url": {"url": "data:,"}}]}]},
    {"messages": [{"role": "tool", "tool_call_id": "1", "content": "42"}]},
    {"messages": [{"role": "assistant", "content": None, "tool_calls": []}]},
    {"messages": [{"role": "user", "content": "   "}]},
    {"messages": []},
    {"input": "hello"},
])
def test_what_is_not_looked_up_by_meaning(body: dict[str, Any]) -> None:
    assert query(body) is None


def test_completions_embed_the_prompt_and_embeddings_are_never_semantic() -> None:
    found = query({"prompt": "Say hi", "max_tokens": 5}, operation="openai.completions")
    assert found is not None and found.text == "Say hi"
    # (an echoed prompt is part of the answer; logprobs are of the answer's own tokens)
    for extra in ({"echo": True}, {"logprobs": 2}):
        assert query({"prompt": "Say hi", **extra}, operation="openai.completions") is None
    assert query({"input": "Say hi"}, operation="openai.embeddings") is None


@pytest.mark.parametrize("a,b,agree", [
    ("What's 15% of 80?", "Calculate fifteen percent of 80.", True),
    ("What is 15% of 80?", "What is 15% of 90?", False),
    ("Give me three tips", "What are 3 tips?", True),
    ("Is Python dynamically typed?", "Isn't Python dynamically typed?", False),
    ("List files modified in the last 7 days", "List files not modified in the last 7 days",
     False),
    ("Sort the users by age in ascending order", "Sort the users by age in descending order",
     False),
    ("Sort the users by age, ascending", "Sort the users by age from youngest", True),
    ("Show commits before 2023", "Show commits after 2023", False),
    ("Convert 5 miles to kilometers", "Convert 5 kilometers to miles", False),
    ("Convert 5 miles to kilometers", "How many kilometers are 5 miles", True),
    ("Arguments for raising the wage", "Arguments against raising the wage", False),
    # (each of these passed: a typographic apostrophe, a minus sign, an article between the
    # turned words, numbers in another order, "non-")
    ("Why does my Python script print anything?", ("Why doesn’t my Python script print "
     "anything?"), False),
    ("Convert -40 degrees Celsius to Fahrenheit.", "Convert 40 degrees Celsius to Fahrenheit.",
     False),
    ("How do I convert a string to an int?", "How do I convert an int to a string?", False),
    ("Is 7 greater than 9?", "Is 9 greater than 7?", False),
    ("Explain deterministic algorithms", "Explain non-deterministic algorithms", False),
    ("What was the death toll of COVID-19?", "What was the death toll of COVID-19 so far?",
     True),
    # (each of these passed too: the same words in another order, an opposite made with a
    # prefix, a negation in another language)
    ("Is the earth bigger than the sun?", "Is the sun bigger than the earth?", False),
    ("What is 100 degrees Celsius in Fahrenheit?", "What is 100 degrees Fahrenheit in Celsius?",
     False),
    ("Did Google acquire YouTube?", "Did YouTube acquire Google?", False),
    ("Convert the date to the format DD/MM/YYYY.", "Convert the date to the format MM/DD/YYYY.",
     False),
    ("Is it safe to eat raw chicken?", "Is it unsafe to eat raw chicken?", False),
    ("Is it possible to resume a download?", "Is it impossible to resume a download?", False),
    ("Ist es sicher, rohes Huhn zu essen?", "Ist es nicht sicher, rohes Huhn zu essen?", False),
    ("Is it safe to eat raw chicken?", "It is safe to eat raw chicken?", True),  # (word order)
    ("How do I reverse a list in Python?", "what's the way to reverse a python list", True),
])
def test_the_guard(a: str, b: str, agree: bool) -> None:
    assert guards_agree(guard_of(a), guard_of(b)) is agree
    assert guards_agree(guard_of(b), guard_of(a)) is agree


def test_a_guard_of_another_version_agrees_with_none() -> None:
    # (stored before the content words were kept: "negations|numbers|polar|turns")
    assert not guards_agree("0|||", guard_of("hello there"))
    assert not guards_agree(guard_of("hello there"), "0|||")
    assert guards_agree(guard_of("hello there"), guard_of("hello there"))


def test_best_applies_the_threshold_and_the_guard() -> None:
    found = query(chat("What is 15% of 80?"))
    assert found is not None
    cache = SemanticCache(_FixedEmbedder(), threshold=0.9)
    candidates = [Candidate(0.99, "wrong-number", guard_of("What is 15% of 90?")),
                  Candidate(0.91, "right", guard_of("Compute 15 percent of 80")),
                  Candidate(0.95, "better", guard_of("what's 15 % of 80")),
                  Candidate(0.85, "too-far", found.guard)]
    assert [c.key for c in cache.best(found, candidates)] == ["better", "right"]
    assert [c.key for c in SemanticCache(_FixedEmbedder(), threshold=0.9, guard=False)
            .best(found, candidates)] == ["wrong-number", "better", "right"]


class _FixedEmbedder:
    name = "fixed"

    async def startup(self) -> None:
        return None

    async def shutdown(self) -> None:
        return None

    async def embed(self, texts: Any) -> list[list[float]]:
        return [[1.0, 0.0] for _ in texts]


@pytest.mark.parametrize("options", [{"threshold": 0}, {"threshold": 1.5}, {"top_k": 0},
                                     {"window_chars": 0}, {"index": "redis"}])
def test_bad_settings_refuse_to_start(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        SemanticCache(_FixedEmbedder(), **options)


def test_opt_in_per_project_and_model() -> None:
    cache = SemanticCache(_FixedEmbedder(), projects=["acme"], models=["gpt"])
    assert cache.applies("acme", "gpt")
    assert not cache.applies("other", "gpt") and not cache.applies("acme", "claude")
    assert SemanticCache(_FixedEmbedder()).applies(None, "anything")


# -- vector indexes ------------------------------------------------------------------------------

async def test_memory_index_nearest_first_within_a_partition_until_expiry() -> None:
    now = [1000.0]
    index = MemoryVectorIndex(max_entries=3, clock=lambda: now[0])
    await index.add("p", unit([1, 0, 0]), "x", "g", 2000)
    await index.add("p", unit([1, 1, 0]), "xy", "g", 1500)
    await index.add("q", unit([1, 0, 0]), "other-partition", "g", 2000)
    found = await index.search("p", unit([1, 0.1, 0]), 5)
    assert [c.key for c in found] == ["x", "xy"]
    assert found[0].similarity == pytest.approx(1 / math.sqrt(1.01), abs=1e-6)
    now[0] = 1600  # "xy" expired
    assert [c.key for c in await index.search("p", unit([1, 1, 0]), 5)] == ["x"]
    await index.add("p", unit([0, 0, 1]), "z", "g", 3000)
    await index.add("p", unit([0, 1, 1]), "yz", "g", 3000)  # the bound drops the oldest
    assert len(index) == 3
    assert "x" not in [c.key for c in await index.search("p", unit([1, 0, 0]), 5)]
    # The rows moved into the freed slots still answer for their own keys.
    assert [c.key for c in await index.search("p", unit([0, 1, 1]), 2)] == ["yz", "z"]
    await index.add("p", unit([1, 0, 0]), "z", "g2", 3000)  # a key's vector is replaced
    assert (await index.search("p", unit([1, 0, 0]), 1))[0].guard == "g2"
    assert await index.search("nowhere", unit([1, 0, 0]), 5) == []


async def test_memory_index_reserves_no_more_than_a_partition_holds() -> None:
    # (each partition reserved 8 rows: most hold one, so 100,000 entries took ~1.2 GB)
    index = MemoryVectorIndex()
    for number in range(20):
        await index.add(f"p{number}", unit([1, 0, 0]), f"k{number}", "g", 2e9)
    rows = sum(len(partition.matrix) for partition in index._partitions.values())
    assert rows == 20
    for number in range(5):  # (a partition that holds more still grows by doubling)
        await index.add("p0", unit([1, number, 0]), f"more{number}", "g", 2e9)
    assert len(index._partitions["p0"].matrix) == 8


async def test_memory_index_takes_no_vector_of_another_size() -> None:
    """An embedder redeployed with another model answers vectors of another size: a search
    is a VectorIndexError (the layer's miss), not NumPy's; an add replaces the partition's
    vectors, which can no longer be compared with the new ones."""
    index = MemoryVectorIndex()
    await index.add("p", unit([1, 0, 0]), "three", "g", 2e9)
    with pytest.raises(VectorIndexError, match="4-dimension"):
        await index.search("p", unit([1, 0, 0, 0]), 5)
    await index.add("p", unit([1, 0, 0, 0]), "four", "g", 2e9)
    assert [c.key for c in await index.search("p", unit([1, 0, 0, 0]), 5)] == ["four"]
    assert len(index) == 1


@pytest.fixture
async def pg_index() -> Any:
    table = "sg_semantic_" + uuid.uuid4().hex[:12]
    index = PgVectorIndex(PG_DSN, dimensions=3, table=table)
    await index.startup()
    yield index
    await index.shutdown()
    async with await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True) as conn:
        await conn.execute(f"DROP TABLE IF EXISTS {table}")


async def test_a_pgvector_table_of_another_size_is_said_not_used(pg_index: PgVectorIndex
                                                                   ) -> None:
    # (configured for 6 dimensions over a table of 3: every search and write failed, each a
    # miss and a warning, for ever, while readiness said "ok")
    other = PgVectorIndex(PG_DSN, dimensions=6, table=pg_index.table)
    await other.startup()
    try:
        ready = await other.check_ready()
        assert ready["semantic_index"].startswith("error: table " + pg_index.table), ready
        assert "holds vector(3), the embedder gives vector(6)" in ready["semantic_index"]
        with pytest.raises(VectorIndexError):
            await other.search("p", unit([1, 0, 0, 0, 0, 0]), 1)
    finally:
        await other.shutdown()


async def test_pgvector_index_search_partitions_expiry_and_upsert(pg_index: PgVectorIndex
                                                                  ) -> None:
    import time
    future = time.time() + 60
    await pg_index.add("p", unit([1, 0, 0]), "x", "g1", future)
    await pg_index.add("p", unit([1, 1, 0]), "xy", "g2", future)
    await pg_index.add("p", unit([0, 0, 1]), "gone", "g", time.time() - 1)
    await pg_index.add("q", unit([1, 0, 0]), "other-partition", "g", future)
    found = await pg_index.search("p", unit([1, 0.1, 0]), 5)
    assert [(c.key, c.guard) for c in found] == [("x", "g1"), ("xy", "g2")]
    assert found[0].similarity == pytest.approx(1 / math.sqrt(1.01), abs=1e-5)
    await pg_index.add("p", unit([0, 1, 0]), "x", "g3", future)  # the same key moves
    assert (await pg_index.search("p", unit([0, 1, 0]), 1))[0].key == "x"
    assert await pg_index.purge_expired() == 1
    with pytest.raises(VectorIndexError):
        await pg_index.search("p", [1.0, 0.0], 1)  # wrong dimensions
    report = await pg_index.check_ready()
    assert report == {"semantic_index": "ok"}


async def test_pgvector_index_purges_expired_rows_in_the_background() -> None:
    import time
    table = "sg_semantic_" + uuid.uuid4().hex[:12]
    index = PgVectorIndex(PG_DSN, dimensions=3, table=table, purge_interval_s=0.1)
    await index.startup()
    try:
        await index.add("p", unit([1, 0, 0]), "gone", "g", time.time() - 1)
        await index.add("p", unit([0, 1, 0]), "kept", "g", time.time() + 60)
        deadline = time.monotonic() + 5
        while True:
            async with await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True) as conn:
                cur = await conn.execute(f"SELECT key FROM {table}")
                keys = {row[0] for row in await cur.fetchall()}
            if keys == {"kept"} or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert keys == {"kept"}
    finally:
        await index.shutdown()
        async with await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True) as conn:
            await conn.execute(f"DROP TABLE IF EXISTS {table}")


async def test_pgvector_index_uses_hnsw(pg_index: PgVectorIndex) -> None:
    async with await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True) as conn:
        cur = await conn.execute("SELECT indexdef FROM pg_indexes WHERE tablename = %s",
                                 (pg_index.table,))
        definitions = " ".join(row[0] for row in await cur.fetchall())
    assert "USING hnsw (embedding vector_cosine_ops)" in definitions


async def test_a_pgvector_that_stops_answering_is_skipped_until_it_answers_again() -> None:
    # A server that accepts connections but never answers cost every lookup the whole
    # timeout; after a failure the index now fails at once for retry_interval_s.
    table = "sg_semantic_" + uuid.uuid4().hex[:12]
    proxy = TcpProxy(5432)
    await proxy.start()
    dsn = PG_DSN.replace("port=5432", f"port={proxy.port}")
    assert dsn != PG_DSN
    index = PgVectorIndex(dsn, dimensions=3, table=table, timeout_s=0.5, retry_interval_s=60)
    await index.startup()
    try:
        await index.add("p", unit([1, 0, 0]), "k", "g", 2e9)
        assert [c.key for c in await index.search("p", unit([1, 0, 0]), 1)] == ["k"]
        proxy.reply_delay_s = 30  # (what it is asked arrives; its answers never come)
        with pytest.raises(VectorIndexError, match="failed: TimeoutError"):
            await index.search("p", unit([1, 0, 0]), 1)
        accepted = proxy.accepted
        for _ in range(3):
            with pytest.raises(VectorIndexError, match="unavailable"):
                await index.search("p", unit([1, 0, 0]), 1)
            with pytest.raises(VectorIndexError, match="unavailable"):
                await index.add("p", unit([1, 0, 0]), "k2", "g", 2e9)
        assert proxy.accepted == accepted  # (not even a connection was tried)
        proxy.reply_delay_s = 0
        await proxy.stop()  # (the held connections dropped: the pool makes new ones)
        await proxy.start()
        for _ in range(100):  # the readiness probe goes through the gate, and opens it
            if (await index.check_ready())["semantic_index"] == "ok":
                break
            await asyncio.sleep(0.1)
        assert [c.key for c in await index.search("p", unit([1, 0, 0]), 1)] == ["k"]
    finally:
        await index.shutdown()
        await proxy.stop()
        async with await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True) as conn:
            await conn.execute(f"DROP TABLE IF EXISTS {table}")


async def test_an_unreachable_pgvector_is_an_error_the_layer_turns_into_a_miss() -> None:
    index = PgVectorIndex(f"host=127.0.0.1 port={free_port()} user=root dbname=test "
                          "connect_timeout=1", dimensions=3)
    await index.startup()
    try:
        with pytest.raises(VectorIndexError):
            await index.search("p", unit([1, 0, 0]), 1)
        with pytest.raises(VectorIndexError):
            await index.add("p", unit([1, 0, 0]), "k", "g", 0)
        assert "error" in (await index.check_ready())["semantic_index"]
    finally:
        await index.shutdown()


# -- embedders -----------------------------------------------------------------------------------

def bag_of_words(text: str, dimensions: int = 64) -> list[float]:
    """The test embedding service's vectors: word counts hashed into 64 buckets."""
    vector = [0.0] * dimensions
    for word in text.lower().replace("?", " ").split():
        vector[zlib.crc32(word.encode()) % dimensions] += 1.0
    return vector


class EmbedService:
    """An HTTP embedding service speaking the `POST /embed` contract, with injectable faults."""

    def __init__(self) -> None:
        self.fault: str | None = None
        self.calls = 0
        self.dimensions = 64  # (a service redeployed with another model answers another size)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": message["type"] + ".complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = await read_body(receive)
        status, payload = 200, {"ok": True}
        if scope["path"] == "/embed":
            self.calls += 1
            texts = orjson.loads(body)["texts"]
            payload = {"embeddings": [bag_of_words(t, self.dimensions) for t in texts],
                       "dimensions": self.dimensions}
            if self.fault == "500":
                status, payload = 500, {"error": "boom"}
            elif self.fault == "count":
                payload["embeddings"] = payload["embeddings"][:-1] + [[]]
            elif self.fault == "dimensions":
                payload["dimensions"] = 32
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": orjson.dumps(payload)})


@pytest.fixture(scope="module")
def embed_service() -> Iterator[tuple[EmbedService, ThreadedServer]]:
    service = EmbedService()
    with ThreadedServer(service, health_path="/health") as server:
        yield service, server


async def test_http_embedder_speaks_the_contract_and_fails_as_embedder_errors(
        embed_service: tuple[EmbedService, ThreadedServer]) -> None:
    service, server = embed_service
    embedder = HttpEmbedder(server.url)
    await embedder.startup()
    try:
        first, second = await embedder.embed(["how are you", "you are how"])
        assert first == pytest.approx(second) and sum(x * x for x in first) == \
            pytest.approx(1.0)
        for fault in ("500", "count", "dimensions"):
            service.fault = fault
            with pytest.raises(EmbedderError):
                await embedder.embed(["a", "b"])
        service.fault = None
    finally:
        await embedder.shutdown()
    dead = HttpEmbedder(f"http://127.0.0.1:{free_port()}", timeout_s=1)
    await dead.startup()
    try:
        with pytest.raises(EmbedderError):
            await dead.embed(["a"])
    finally:
        await dead.shutdown()


def test_openai_embedder_through_the_gateways_own_embeddings_model(
        tmp_path: Path, mock_url: str, mock: MockProviderServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SG_EMBED_KEY", TEST_KEY)
    config = write_config(tmp_path, mock_config(mock_url))
    with ThreadedServer(create_app(config)) as gateway:
        embedder = OpenAIEmbedder(gateway.url + "/v1", "openai-embed", key_env="SG_EMBED_KEY")

        async def run() -> list[list[float]]:
            await embedder.startup()
            try:
                return await embedder.embed(["alpha", "beta", "alpha"])
            finally:
                await embedder.shutdown()
        a, b, again = asyncio.run(run())
    assert a == pytest.approx(again) and a != pytest.approx(b)
    assert sum(x * x for x in a) == pytest.approx(1.0)
    assert any("text-embedding-3-small" in str(r) for r in mock.requests)  # it went upstream


@pytest.mark.parametrize("index", ["0", 0.5, None, [0]])
async def test_openai_embedder_refuses_an_index_that_is_not_an_integer(
        index: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    embedder = OpenAIEmbedder("http://127.0.0.1:1/v1", "m")

    async def answer(payload: dict[str, Any]) -> Any:
        return {"data": [{"index": 1, "embedding": [1.0, 0.0]},
                         {"index": index, "embedding": [0.0, 1.0]}]}
    monkeypatch.setattr(embedder, "_post", answer)
    with pytest.raises(EmbedderError, match="index"):
        await embedder.embed(["a", "b"])


def test_openai_embedder_needs_its_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SG_NO_SUCH_KEY", raising=False)
    with pytest.raises(ConfigError):
        OpenAIEmbedder("http://127.0.0.1:1/v1", "m", key_env="SG_NO_SUCH_KEY")
    with pytest.raises(ConfigError):
        HttpEmbedder("ftp://example")


@pytest.fixture(scope="module")
def local_embedder() -> Iterator[LocalEmbedder]:
    embedder = LocalEmbedder()
    loop = asyncio.new_event_loop()
    loop.run_until_complete(embedder.startup())
    yield embedder
    loop.run_until_complete(embedder.shutdown())
    loop.close()


def test_local_embedder_refuses_a_text_longer_than_it_reads(local_embedder: LocalEmbedder
                                                             ) -> None:
    # The model reads 256 tokens and cut the rest silently: a policy document followed by
    # different questions about it was one vector (a hit answering another question).
    policy = "Employees may claim travel costs within the limits set out below. " * 25
    async def run() -> tuple[list[BaseException | list[list[float]]], list[list[float]]]:
        long_ones = await asyncio.gather(
            local_embedder.embed([policy + "What does this policy say about taxis?"]),
            local_embedder.embed([policy + "Translate this policy into Spanish."]),
            return_exceptions=True)
        return long_ones, await local_embedder.embed(["What does the policy say?"])
    loop = asyncio.new_event_loop()
    try:
        long_ones, short = loop.run_until_complete(run())
    finally:
        loop.close()
    assert all(isinstance(error, EmbedderError) for error in long_ones), long_ones
    assert len(short) == 1 and len(short[0]) == 384  # (batched with them, still answered)


def test_local_embedder_refuses_a_text_with_characters_it_cannot_read(
        local_embedder: LocalEmbedder) -> None:
    # Outside its vocabulary a run of characters is one [UNK] token: "how to make tom yum"
    # and "why is the sky blue" in Thai, or two emoji questions, were one vector (a hit
    # answering another question). Such texts are cached exactly, never by meaning.
    async def run() -> list[BaseException | list[list[float]]]:
        return await asyncio.gather(*(local_embedder.embed([text]) for text in (
            "วิธีทำต้มยำกุ้ง", "ทำไมท้องฟ้าเป็นสีฟ้า", "🚀🌕?", "What does 🍕 mean?",
            "Ist es nicht sicher?", "Café au lait, naïve résumé")), return_exceptions=True)
    loop = asyncio.new_event_loop()
    try:
        results = loop.run_until_complete(run())
    finally:
        loop.close()
    assert [type(result).__name__ for result in results] == [
        "TextNotEmbedded"] * 4 + ["list", "list"]


def test_a_local_model_at_a_path_of_its_own_is_named_by_it(tmp_path: Path) -> None:
    # The embedder's name is in the semantic partition: another model's vectors, even of
    # the same size, are never compared with the packaged model's.
    packaged = LocalEmbedder()
    other = LocalEmbedder(model_path=str(tmp_path))
    assert packaged.name == "all-MiniLM-L6-v2"
    assert other.name == f"local:{tmp_path.resolve()}"
    assert query(chat("hi"), embedder=packaged.name).partition != \
        query(chat("hi"), embedder=other.name).partition


def test_local_embedder_puts_paraphrases_closer_than_near_topics(local_embedder: LocalEmbedder
                                                                 ) -> None:
    async def run() -> list[list[float]]:
        # Concurrent callers are encoded together, and each gets its own vector back.
        parts = await asyncio.gather(
            local_embedder.embed(["How do I reverse a list in Python?"]),
            local_embedder.embed(["what's the way to reverse a python list",
                                  "How do I sort a dictionary in Go?"]))
        return [*parts[0], *parts[1]]
    loop = asyncio.new_event_loop()
    try:
        question, paraphrase, other = loop.run_until_complete(run())
    finally:
        loop.close()

    def cos(x: list[float], y: list[float]) -> float:
        return sum(a * b for a, b in zip(x, y, strict=True))
    assert len(question) == 384
    assert cos(question, paraphrase) > 0.9
    assert cos(question, other) < 0.5


# -- through a gateway ---------------------------------------------------------------------------

def stack(semantic: str) -> str:
    return ("[Middleware(AuthMiddleware, keys=[StaticKey('tests', key_env='SG_TEST_KEY'), "
            "StaticKey('other', key_env='SG_OTHER_KEY')]), "
            "Middleware(QuotaMiddleware, limits=Limits(budgets=(Budget('100'),))), "
            f"Middleware(CacheMiddleware, semantic={semantic})]")


def start_gateway(tmp_path: Path, mock_url: str, semantic: str) -> ThreadedServer:
    extra = ("from middleware.cache.semantic import SemanticCache, LocalEmbedder, "
             "HttpEmbedder, PgVectorIndex")
    config = write_config(tmp_path, mock_config(mock_url, middleware=stack(semantic))
                          .replace("from middleware.cache import CacheMiddleware",
                                   "from middleware.cache import CacheMiddleware\n" + extra))
    return ThreadedServer(create_app(config))


@pytest.fixture(scope="module", params=["memory", "pgvector"])
def semantic_gateway(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                     mock_url: str) -> Iterator[ThreadedServer]:
    import os
    os.environ["SG_OTHER_KEY"] = OTHER_KEY
    table = "sg_semantic_" + uuid.uuid4().hex[:12]
    index = "'memory'" if request.param == "memory" else \
        f"PgVectorIndex({PG_DSN!r}, table={table!r})"
    with start_gateway(tmp_path_factory.mktemp("semantic"), mock_url,
                       f"SemanticCache(LocalEmbedder(), {index})") as server:
        yield server
    if request.param == "pgvector":
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {table}")


def ask(server: ThreadedServer, text: str, *, session: str, key: str = TEST_KEY,
        **extra: Any) -> Any:
    """A chat request whose system prompt names the test's session: the system prompt is part
    of the semantic partition, so tests (and reruns) never see each other's answers."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    return client.chat.completions.with_raw_response.create(
        model="gpt-mock", temperature=0, messages=[
            {"role": "system", "content": f"Test session {session}."},
            {"role": "user", "content": text}], **extra)


ONLY_IF_CACHED = {"cache-control": "only-if-cached"}


def ask_until_stored(server: ThreadedServer, text: str, *, session: str, **extra: Any) -> Any:
    """Asks once (a miss), then waits until the answer is stored: it asks again with
    only-if-cached (a hit, or a 504 that never reaches upstream), so the upstream calls a
    test counts are its own whenever the write lands."""
    import time
    first = ask(server, text, session=session, **extra)
    assert first.headers["x-sluicegate-cache"] == "miss"
    deadline = time.monotonic() + 10
    while True:
        try:
            if ask(server, text, session=session, extra_headers=ONLY_IF_CACHED, **extra) \
                    .headers["x-sluicegate-cache"] == "hit":
                return first
        except openai.APIStatusError as exc:
            assert exc.status_code == 504, exc
        assert time.monotonic() < deadline, "the answer was never stored"
        time.sleep(0.05)


def upstream_calls(mock: MockProviderServer, session: str) -> int:
    return len([r for r in mock.requests if session in str(r)])


def test_a_paraphrase_is_answered_from_the_cache(semantic_gateway: ThreadedServer,
                                                 mock: MockProviderServer) -> None:
    session = uuid.uuid4().hex
    first = ask_until_stored(semantic_gateway, "How do I reverse a list in Python?",
                             session=session)
    again = ask(semantic_gateway, "what's the way to reverse a python list", session=session)
    assert again.headers["x-sluicegate-cache"] == "semantic-hit"
    assert again.parse().choices[0].message.content == first.parse().choices[0].message.content
    assert again.parse().usage.model_extra == {"x_sluicegate_cached": True}
    assert upstream_calls(mock, session) == 1


def test_near_misses_other_tenants_and_no_cache_go_upstream(semantic_gateway: ThreadedServer,
                                                            mock: MockProviderServer) -> None:
    session = uuid.uuid4().hex
    ask_until_stored(semantic_gateway, "What is 15% of 80?", session=session)
    ask_until_stored(semantic_gateway, "How do I install a specific version of a package with "
                                       "pip?", session=session)
    paraphrase = "pip: how to install a particular version of a package"
    assert ask(semantic_gateway, paraphrase, session=session) \
        .headers["x-sluicegate-cache"] == "semantic-hit"
    assert ask(semantic_gateway, "What is 15% of 90?", session=session) \
        .headers["x-sluicegate-cache"] == "miss"
    assert ask(semantic_gateway, paraphrase, session=session, key=OTHER_KEY) \
        .headers["x-sluicegate-cache"] == "miss"
    assert ask(semantic_gateway, paraphrase, session=session,
               extra_headers={"cache-control": "no-cache"}).headers["x-sluicegate-cache"] == \
        "miss"
    assert upstream_calls(mock, session) == 5  # two stored, then three misses


def test_a_semantic_hit_replays_as_a_stream_and_in_anthropic_shape(
        semantic_gateway: ThreadedServer, mock: MockProviderServer) -> None:
    session = uuid.uuid4().hex
    first = ask_until_stored(semantic_gateway, "What's the difference between VAT and sales "
                                               "tax?", session=session)
    client = openai.OpenAI(base_url=semantic_gateway.url + "/v1", api_key=TEST_KEY,
                           max_retries=0)
    with client.chat.completions.with_streaming_response.create(
            model="gpt-mock", temperature=0, stream=True,
            messages=[{"role": "system", "content": f"Test session {session}."},
                      {"role": "user", "content": "How is VAT different from sales tax?"}]
    ) as response:
        assert response.headers["x-sluicegate-cache"] == "semantic-hit"
        text = "".join(chunk.choices[0].delta.content or "" for chunk in response.parse()
                       if chunk.choices)
    assert text == first.parse().choices[0].message.content
    claude = anthropic.Anthropic(base_url=semantic_gateway.url, api_key=TEST_KEY,
                                 max_retries=0)

    def once(text: str) -> Any:
        return claude.messages.with_raw_response.create(
            model="claude-mock", max_tokens=50, extra_headers={"x-sluicegate-cache": "on"},
            system=f"Test session {session}.", messages=[{"role": "user", "content": text}])
    stored = once("How do I cancel my subscription?")
    import time
    deadline = time.monotonic() + 10
    while True:  # until stored, asking only the cache (see ask_until_stored)
        try:
            if claude.messages.with_raw_response.create(
                    model="claude-mock", max_tokens=50,
                    extra_headers={"x-sluicegate-cache": "on", **ONLY_IF_CACHED},
                    system=f"Test session {session}.",
                    messages=[{"role": "user", "content": "How do I cancel my subscription?"}]
            ).headers["x-sluicegate-cache"] == "hit":
                break
        except anthropic.APIStatusError as exc:
            assert exc.status_code == 504, exc
        assert time.monotonic() < deadline
        time.sleep(0.05)
    paraphrased = once("I'd like to cancel my subscription - how do I do that?")
    assert paraphrased.headers["x-sluicegate-cache"] == "semantic-hit"
    assert paraphrased.parse().content[0].text == stored.parse().content[0].text
    assert upstream_calls(mock, session) == 2


def test_a_failing_embedder_is_a_miss_never_an_error(tmp_path: Path, mock_url: str,
                                                     mock: MockProviderServer) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    session = uuid.uuid4().hex
    with start_gateway(tmp_path, mock_url,
                       f"SemanticCache(HttpEmbedder({dead!r}, timeout_s=1))") as server:
        ask_until_stored(server, "Say hello", session=session)  # the exact cache still works
        assert ask(server, "Please say hello", session=session) \
            .headers["x-sluicegate-cache"] == "miss"
    assert upstream_calls(mock, session) == 2


def test_the_http_embedder_drives_semantic_hits(
        tmp_path: Path, mock_url: str, mock: MockProviderServer,
        embed_service: tuple[EmbedService, ThreadedServer]) -> None:
    service_app, service = embed_service
    session = uuid.uuid4().hex
    with start_gateway(tmp_path, mock_url, f"SemanticCache(HttpEmbedder({service.url!r}))"
                       ) as server:
        ask_until_stored(server, "reverse a python list", session=session)
        # The bag-of-words service sees the same words, capitalised and asked, as the same text.
        assert ask(server, "Reverse a Python list?", session=session) \
            .headers["x-sluicegate-cache"] == "semantic-hit"
        embedded = service_app.calls
        with pytest.raises(openai.APIStatusError) as refused:  # nothing to look up or store
            ask(server, "Reverse a Python list?", session=session,
                extra_headers={"cache-control": "only-if-cached, no-cache"})
        assert refused.value.status_code == 504
        assert service_app.calls == embedded  # so nothing was embedded
    assert upstream_calls(mock, session) == 1


def test_the_speaker_name_keeps_one_participant_from_answering_for_another(
        tmp_path: Path, mock_url: str, mock: MockProviderServer,
        embed_service: tuple[EmbedService, ThreadedServer],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SG_OTHER_KEY", OTHER_KEY)
    _, service = embed_service
    session = uuid.uuid4().hex
    client_messages = [{"role": "system", "content": f"Session {session}. Greet by name."}]
    with start_gateway(tmp_path, mock_url, f"SemanticCache(HttpEmbedder({service.url!r}))"
                       ) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=TEST_KEY, max_retries=0)

        def said_by(name: str, **extra: Any) -> Any:
            return client.chat.completions.with_raw_response.create(
                model="gpt-mock", temperature=0, **extra, messages=[
                    *client_messages,
                    {"role": "user", "name": name, "content": "Hello, who am I?"}])
        assert said_by("alice").headers["x-sluicegate-cache"] == "miss"
        wait_until_cached(lambda: said_by("alice", extra_headers=ONLY_IF_CACHED))
        assert said_by("bob").headers["x-sluicegate-cache"] == "miss"
    assert upstream_calls(mock, session) == 2


def test_an_embedder_that_changes_its_dimensions_is_a_miss_not_an_error(
        tmp_path: Path, mock_url: str, mock: MockProviderServer,
        embed_service: tuple[EmbedService, ThreadedServer],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SG_OTHER_KEY", OTHER_KEY)
    service_app, service = embed_service
    session = uuid.uuid4().hex
    with start_gateway(tmp_path, mock_url, f"SemanticCache(HttpEmbedder({service.url!r}))"
                       ) as server:
        ask_until_stored(server, "reverse a python list", session=session)
        service_app.dimensions = 96  # the service was redeployed with another model
        try:
            again = ask(server, "Reverse a Python list?", session=session)  # an exact miss
            assert again.status_code == 200 and again.headers["x-sluicegate-cache"] == "miss"
            # its answer is indexed with the new size: the next paraphrase is a hit again
            wait_until_cached(lambda: ask(server, "Reverse a Python list?", session=session,
                                          extra_headers=ONLY_IF_CACHED))
            assert ask(server, "reverse a python list?", session=session) \
                .headers["x-sluicegate-cache"] == "semantic-hit"
        finally:
            service_app.dimensions = 64
    assert upstream_calls(mock, session) == 2


def wait_until_cached(probe: Any) -> None:
    """Until `probe()` (a request with only-if-cached) is a hit."""
    import time
    deadline = time.monotonic() + 10
    while True:
        try:
            if probe().headers["x-sluicegate-cache"] in ("hit", "semantic-hit"):
                return
        except openai.APIStatusError as exc:
            assert exc.status_code == 504, exc
        assert time.monotonic() < deadline, "never stored"
        time.sleep(0.05)
