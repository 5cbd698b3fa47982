// stream.mjs — does the official OpenAI SDK stream through pep as it does from the upstream?
//
// Runs client.chat.completions.create({model, messages, stream: true}) with the `openai`
// npm package twice: directly against mockllm, then through pep (an agent token as the API
// key), and compares what the SDK yields: the same chunks, the same content.  With
// SDKCHECK_SPACING_MS > 0 it first scripts mockllm's `sse` fault before each run (chunks
// that many ms apart) and records when each chunk reaches the SDK, to show that pep relays
// them as they come instead of buffering the answer.
//
// Not part of `make test` (tests must not fetch from the internet): see README.md here.
//
//   MOCK_URL=http://127.0.0.1:M PEP_URL=http://127.0.0.1:P PEP_AGENT_TOKEN=eyJ… \
//       node stream.mjs
//
// Environment: MOCK_URL, PEP_URL, PEP_AGENT_TOKEN (required); SDKCHECK_MODEL (default
// gpt-4o-mini); SDKCHECK_CHUNKS (default 5) and SDKCHECK_SPACING_MS (default 400; 0 =
// mockllm's default 3 unspaced chunks).  Exit status 0 when both runs agree (and, when
// spaced, the chunks arrived spread out through pep), 1 otherwise.
import OpenAI from "openai";

const env = (name, dflt) => {
  const v = process.env[name];
  if (v === undefined || v === "") {
    if (dflt === undefined) {
      console.error(`stream.mjs: set ${name}`);
      process.exit(2);
    }
    return dflt;
  }
  return v;
};

const MOCK_URL = env("MOCK_URL").replace(/\/$/, "");
const PEP_URL = env("PEP_URL").replace(/\/$/, "");
const TOKEN = env("PEP_AGENT_TOKEN");
const MODEL = env("SDKCHECK_MODEL", "gpt-4o-mini");
const CHUNKS = Number(env("SDKCHECK_CHUNKS", "5"));
const SPACING = Number(env("SDKCHECK_SPACING_MS", "400"));

// Scripts the next chat completion of mockllm as `chunks` events `spacing` ms apart.
async function scriptStream() {
  if (SPACING <= 0) return;
  const r = await fetch(`${MOCK_URL}/_mock/faults`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({
      kind: "sse",
      count: 1,
      chunks: CHUNKS,
      chunk_delay_ms: SPACING,
      path: "/v1/chat/completions",
    }),
  });
  if (!r.ok) throw new Error(`mockllm refused the fault: ${r.status} ${await r.text()}`);
}

// One streamed completion through the SDK: the chunks it yielded, when, and the headers.
async function run(label, baseURL, apiKey) {
  await scriptStream();
  const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 30000 });
  const t0 = performance.now();
  const { data: stream, response } = await client.chat.completions
    .create({
      model: MODEL,
      messages: [{ role: "user", content: "Say hi" }],
      stream: true,
    })
    .withResponse();
  const chunks = [];
  for await (const chunk of stream) {
    chunks.push({ ms: Math.round(performance.now() - t0), chunk });
  }
  const total = Math.round(performance.now() - t0);
  const headers = {};
  for (const h of ["content-type", "pep-upstream", "pep-model", "pep-attempts", "pep-request-id"])
    if (response.headers.get(h) !== null) headers[h] = response.headers.get(h);
  console.log(`\n== ${label}: ${baseURL}  (HTTP ${response.status}, ${total} ms)`);
  for (const [k, v] of Object.entries(headers)) console.log(`   ${k}: ${v}`);
  for (const { ms, chunk } of chunks) {
    const c = chunk.choices?.[0];
    console.log(
      `   +${String(ms).padStart(5)} ms  ${chunk.object} model=${chunk.model} ` +
        `delta=${JSON.stringify(c?.delta)} finish_reason=${c?.finish_reason ?? null}`,
    );
  }
  const content = chunks.map(({ chunk }) => chunk.choices?.[0]?.delta?.content ?? "").join("");
  console.log(`   content: ${JSON.stringify(content)}`);
  return { label, chunks, content, total, headers };
}

// What must be equal in both runs: everything but the per-stream id and creation time.
const normal = ({ chunk }) => {
  const { id: _id, created: _created, ...rest } = chunk;
  return JSON.stringify(rest);
};

const problems = [];
const direct = await run("direct to mockllm", `${MOCK_URL}/v1`, "unused-by-mockllm");
const viaPep = await run("through pep", `${PEP_URL}/v1`, TOKEN);

if (direct.chunks.length === 0) problems.push("the direct run yielded no chunk");
if (direct.chunks.length !== viaPep.chunks.length)
  problems.push(`chunk count differs: ${direct.chunks.length} vs ${viaPep.chunks.length}`);
direct.chunks.forEach((c, i) => {
  const p = viaPep.chunks[i];
  if (p && normal(c) !== normal(p))
    problems.push(`chunk ${i} differs:\n     ${normal(c)}\n     ${normal(p)}`);
});
if (direct.content !== viaPep.content)
  problems.push(`content differs: ${JSON.stringify(direct.content)} vs ${JSON.stringify(viaPep.content)}`);
if (!(viaPep.headers["content-type"] || "").startsWith("text/event-stream"))
  problems.push(`pep's Content-Type is ${viaPep.headers["content-type"]}`);
if (!viaPep.headers["pep-upstream"]) problems.push("pep's answer has no Pep-Upstream");

if (SPACING > 0) {
  // Incremental: through pep, the first chunk must come long before the last one (the
  // upstream needs (CHUNKS - 1) × SPACING ms to produce them all); half of that is a
  // bound no buffering proxy can meet.
  for (const r of [direct, viaPep]) {
    const spread = r.chunks.at(-1).ms - r.chunks[0].ms;
    const want = ((CHUNKS - 1) * SPACING) / 2;
    console.log(`\n${r.label}: first chunk at ${r.chunks[0].ms} ms, last at ${r.chunks.at(-1).ms} ms ` +
                `(spread ${spread} ms, upstream spacing ${SPACING} ms)`);
    if (spread < want) problems.push(`${r.label}: chunks arrived within ${spread} ms (< ${want}): buffered?`);
  }
}

if (problems.length) {
  console.log("\nFAIL");
  for (const p of problems) console.log(` - ${p}`);
  process.exit(1);
}
console.log(`\nOK: the SDK yielded the same ${direct.chunks.length} chunks and content both ways` +
            (SPACING > 0 ? ", and through pep they arrived as the upstream produced them" : ""));
