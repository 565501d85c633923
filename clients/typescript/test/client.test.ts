/**
 * The client against real Sluice servers, started by tests/clients/test_typescript.py:
 *   SLUICE_ADDRESS           the example models (and a generation model, when served)
 *   SLUICE_HOLDING_ADDRESS   its `simple` model holds every call (deadlines, cancellation)
 *   SLUICE_DRAINING_ADDRESS  sheds inference with UNAVAILABLE + SLUICE_PUSHBACK_MS pushback
 *   SLUICE_GENERATION_MODEL  a generation model's name ("" when none is served)
 *   SLUICE_EXPECTED_TEXT     what SLUICE_GENERATION_PROMPT generates greedily (8 tokens)
 *   SLUICE_TLS_ADDRESS       requires client certificates (mTLS); SLUICE_TLS_CA_FILE signed
 *                            its certificate and the client ones, SLUICE_TLS_CLIENT_* and
 *                            SLUICE_TLS_ADMIN_* (named in its admin.identities) are PEM
 *                            certificate / key pairs
 */
import assert from "node:assert/strict";
import { after, describe, test } from "node:test";

import { SluiceClient, SluiceError, status, type TlsOptions } from "../src/index";

const env = process.env;
const address = env.SLUICE_ADDRESS;
const skip = address === undefined ? "SLUICE_ADDRESS is not set (pytest tests/clients starts the servers)" : false;
const generationModel = env.SLUICE_GENERATION_MODEL ?? "";
const skipGeneration = skip || (generationModel === "" ? "the server serves no generation model" : false);
const prompt = env.SLUICE_GENERATION_PROMPT ?? "Once upon a time";

const client = new SluiceClient(address);
after(() => client.close());

function open(target: string | undefined, timeoutMs?: number): SluiceClient {
  assert.ok(target, "the server address is set");
  const opened = new SluiceClient(target, timeoutMs === undefined ? {} : { timeoutMs });
  after(() => opened.close());
  return opened;
}

function ints(values: number[]): Int32Array {
  return Int32Array.from(values);
}

function isSluiceError(code: status) {
  return (error: unknown): boolean => {
    assert.ok(error instanceof SluiceError, `a SluiceError, not ${String(error)}`);
    assert.equal(error.code, code, error.message);
    return true;
  };
}

describe("inference", { skip }, () => {
  const a = ints([...Array(16).keys()]);
  const b = ints(Array(16).fill(3));

  test("health and probes", async () => {
    assert.equal(await client.health(), "SERVING");
    assert.equal(await client.health("sluice.model.simple"), "SERVING");
    await assert.rejects(client.health("sluice.model.nope"), isSluiceError(status.NOT_FOUND));
    assert.equal(await client.live(), true);
    assert.equal(await client.ready(), true);
    const meta = await client.serverMetadata();
    assert.ok(meta.extensions.includes("model_repository"), meta.extensions.join());
  });

  test("infer simple adds and subtracts", async () => {
    const result = await client.infer(
      "simple",
      { INPUT0: { shape: [1, 16], data: a }, INPUT1: { shape: [1, 16], data: b } },
      { requestId: "ts-1" },
    );
    assert.equal(result.id, "ts-1");
    assert.deepEqual([result.model, result.version], ["simple", "1"]);
    const { OUTPUT0, OUTPUT1 } = result.outputs;
    assert.ok(OUTPUT0 && OUTPUT1);
    assert.equal(OUTPUT0.datatype, "INT32");
    assert.deepEqual(OUTPUT0.shape, [1, 16]);
    assert.deepEqual(Array.from(OUTPUT0.data as Int32Array), Array.from(a, (x, i) => x + b[i]!));
    assert.deepEqual(Array.from(OUTPUT1.data as Int32Array), Array.from(a, (x, i) => x - b[i]!));
  });

  test("infer returns only the requested outputs", async () => {
    const inputs = { INPUT0: { shape: [1, 16], data: a }, INPUT1: { shape: [1, 16], data: b } };
    const result = await client.infer("simple", inputs, { outputs: ["OUTPUT1"] });
    assert.deepEqual(Object.keys(result.outputs), ["OUTPUT1"]);
  });

  test("infer mlp gives probabilities", async () => {
    const x = Float32Array.from({ length: 2 * 64 }, (_, i) => Math.sin(i));
    const { outputs } = await client.infer("mlp", { input: { shape: [2, 64], data: x } });
    const probabilities = outputs.probabilities;
    assert.ok(probabilities);
    assert.deepEqual([probabilities.datatype, probabilities.shape], ["FP32", [2, 10]]);
    const p = Array.from(probabilities.data as Float32Array);
    for (const row of [p.slice(0, 10), p.slice(10)]) {
      assert.ok(Math.abs(row.reduce((s, v) => s + v, 0) - 1) < 1e-4, row.join());
      assert.ok(row.every((v) => v > 0 && v < 1));
    }
  });

  test("model operations", async () => {
    const models = await client.models();
    assert.ok(models.some((m) => m.name === "simple" && m.version === "1" && m.state === "READY"));
    const simple = (await client.listModels()).find((m) => m.name === "simple");
    assert.ok(simple);
    assert.equal(simple.state, "READY");
    assert.equal(simple.breakerState, "CLOSED");
    assert.notEqual(simple.backend, "");
    const metadata = await client.modelMetadata("simple");
    assert.deepEqual(metadata.inputs.map((t) => [t.name, t.datatype, t.shape]), [
      ["INPUT0", "INT32", [-1, 16]],
      ["INPUT1", "INT32", [-1, 16]],
    ]);
    assert.equal((await client.modelConfig("mlp"))?.maxBatchSize, 32);
    assert.notEqual((await client.capabilities()).onnxruntimeVersion, "");
  });

  test("unload and load", async () => {
    await client.unloadModel("passthrough");
    assert.equal(await client.modelReady("passthrough"), false);
    await client.loadModel("passthrough");
    assert.equal(await client.modelReady("passthrough"), true);
    await assert.rejects(client.loadModel("nope"), isSluiceError(status.NOT_FOUND));
  });

  test("errors carry their status and request id", async () => {
    const inputs = { INPUT0: { shape: [1, 16], data: a }, INPUT1: { shape: [1, 16], data: b } };
    await assert.rejects(client.infer("nope", inputs), (error: unknown) => {
      assert.ok(error instanceof SluiceError);
      assert.equal(error.codeName, "NOT_FOUND");
      assert.notEqual(error.requestId, "");
      return true;
    });
    const floats = { INPUT0: { shape: [1, 16], data: new Float32Array(16) }, INPUT1: inputs.INPUT1 };
    await assert.rejects(client.infer("simple", floats), isSluiceError(status.INVALID_ARGUMENT));
  });

  test("a call's deadline, and the client's default one", async () => {
    const inputs = { INPUT0: { shape: [1, 16], data: a }, INPUT1: { shape: [1, 16], data: b } };
    const holding = open(env.SLUICE_HOLDING_ADDRESS);
    await assert.rejects(holding.infer("simple", inputs, { timeoutMs: 100 }), isSluiceError(status.DEADLINE_EXCEEDED));
    const impatient = open(env.SLUICE_HOLDING_ADDRESS, 100);
    await assert.rejects(impatient.infer("simple", inputs), isSluiceError(status.DEADLINE_EXCEEDED));
    assert.equal(await impatient.ready(), true);
  });

  test("an AbortSignal cancels a call", async () => {
    const inputs = { INPUT0: { shape: [1, 16], data: a }, INPUT1: { shape: [1, 16], data: b } };
    const holding = open(env.SLUICE_HOLDING_ADDRESS);
    const controller = new AbortController();
    const call = holding.infer("simple", inputs, { signal: controller.signal });
    setTimeout(() => controller.abort(), 50);
    await assert.rejects(call, { name: "AbortError" });
  });

  test("UNAVAILABLE is retried after the server's pushback, then raised", async () => {
    const pushbackMs = Number(env.SLUICE_PUSHBACK_MS);
    const draining = open(env.SLUICE_DRAINING_ADDRESS);
    const inputs = { INPUT0: { shape: [1, 16], data: a }, INPUT1: { shape: [1, 16], data: b } };
    const started = performance.now();
    await assert.rejects(draining.infer("simple", inputs, { requestId: "ts-shed" }), (error: unknown) => {
      assert.ok(error instanceof SluiceError);
      assert.equal(error.code, status.UNAVAILABLE);
      assert.equal(error.retryAfterMs, pushbackMs);
      return true;
    });
    // Four attempts, three waits of the server's pushback in between.
    assert.ok(performance.now() - started >= 3 * pushbackMs, "the pushback was honoured");
    assert.equal(await draining.live(), true);
  });
});

describe("tls", { skip }, () => {
  const simple = {
    INPUT0: { shape: [1, 16], data: ints([...Array(16).keys()]) },
    INPUT1: { shape: [1, 16], data: ints(Array(16).fill(1)) },
  };

  function tlsClient(tls: TlsOptions): SluiceClient {
    const opened = new SluiceClient(env.SLUICE_TLS_ADDRESS, { tls, timeoutMs: 10_000 });
    after(() => opened.close());
    return opened;
  }

  function mtls(who: "CLIENT" | "ADMIN"): TlsOptions {
    return {
      caFile: env.SLUICE_TLS_CA_FILE,
      certFile: env[`SLUICE_TLS_${who}_CERT_FILE`],
      keyFile: env[`SLUICE_TLS_${who}_KEY_FILE`],
      serverName: "localhost",
    };
  }

  test("mTLS with a CA, a client certificate and a server name", async () => {
    const secure = tlsClient(mtls("CLIENT"));
    assert.equal(await secure.health(), "SERVING");
    const result = await secure.infer("simple", simple);
    assert.deepEqual(Array.from(result.outputs.OUTPUT0!.data as Int32Array), [...Array(16).keys()].map((x) => x + 1));
    // Changes need a certificate named in admin.identities.
    await assert.rejects(secure.loadModel("simple"), isSluiceError(status.PERMISSION_DENIED));
  });

  test("an admin certificate may change what is served", async () => {
    const admin = tlsClient(mtls("ADMIN"));
    await admin.loadModel("simple");
    assert.equal(await admin.modelReady("simple"), true);
  });

  test("without a client certificate, or for another name, the handshake fails", async () => {
    const anonymous = tlsClient({ caFile: env.SLUICE_TLS_CA_FILE });
    await assert.rejects(anonymous.health(), isSluiceError(status.UNAVAILABLE));
    const misnamed = tlsClient({ ...mtls("CLIENT"), serverName: "elsewhere.sluice.test" });
    await assert.rejects(misnamed.health(), isSluiceError(status.UNAVAILABLE));
  });
});

describe("generation", { skip: skipGeneration }, () => {
  test("streamed chunks join into the whole generation", async () => {
    const chunks = [];
    for await (const chunk of client.generate(generationModel, prompt, { maxNewTokens: 8 })) {
      chunks.push(chunk);
    }
    assert.ok(chunks.length >= 2, `${chunks.length} chunks`);
    const last = chunks.at(-1)!;
    assert.ok(last.finishReason === "length" || last.finishReason === "stop", last.finishReason);
    assert.ok(chunks.slice(0, -1).every((c) => c.finishReason === undefined && c.usage === undefined));
    const tokens = chunks.flatMap((c) => c.tokenIds);
    assert.equal(last.usage?.completionTokens, tokens.length);
    const joined = chunks.map((c) => c.text).join("");
    const whole = await client.generateText(generationModel, prompt, { maxNewTokens: 8 });
    assert.equal(whole.text, joined);
    assert.deepEqual(whole.tokenIds, tokens);
    if (env.SLUICE_EXPECTED_TEXT !== undefined) assert.equal(joined, env.SLUICE_EXPECTED_TEXT);
    const counted = await client.countTokens(generationModel, prompt);
    assert.equal(counted.tokenCount, last.usage?.promptTokens);
    assert.ok(counted.maxContext > counted.tokenCount);
  });

  test("aborting mid-stream cancels the generation", async () => {
    const controller = new AbortController();
    const received: string[] = [];
    const { maxContext, tokenCount } = await client.countTokens(generationModel, prompt);
    const stream = client.generate(generationModel, prompt, {
      maxNewTokens: maxContext - tokenCount,
      signal: controller.signal,
    });
    await assert.rejects(
      (async () => {
        for await (const chunk of stream) {
          received.push(chunk.text);
          controller.abort();
        }
      })(),
      { name: "AbortError" },
    );
    assert.equal(received.length, 1);
  });

  test("leaving the loop early ends the call", async () => {
    for await (const chunk of client.generate(generationModel, prompt, { maxNewTokens: 32 })) {
      assert.equal(typeof chunk.text, "string");
      break;
    }
    assert.equal((await client.generateText(generationModel, prompt, { maxNewTokens: 2 })).usage?.completionTokens, 2);
  });

  test("a generation's deadline and an unknown model", async () => {
    const { maxContext, tokenCount } = await client.countTokens(generationModel, prompt);
    const long = client.generateText(generationModel, prompt, { maxNewTokens: maxContext - tokenCount, timeoutMs: 20 });
    await assert.rejects(long, isSluiceError(status.DEADLINE_EXCEEDED));
    await assert.rejects(client.generateText("nope", prompt), isSluiceError(status.NOT_FOUND));
  });
});
