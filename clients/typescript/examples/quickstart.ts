// Infer on the example model, stream a generation and check health:
//   npm run build && node dist/examples/quickstart.js [address] [generation model]
import { SluiceClient, SluiceError } from "../src/index";

async function main(): Promise<void> {
  const [address = "127.0.0.1:8001", model = "tiny_llama"] = process.argv.slice(2);
  const client = new SluiceClient(address, { timeoutMs: 10_000 });
  try {
    console.log("health:", await client.health());

    const a = Int32Array.from({ length: 16 }, (_, i) => i);
    const b = new Int32Array(16).fill(1);
    const result = await client.infer("simple", {
      INPUT0: { shape: [1, 16], data: a },
      INPUT1: { shape: [1, 16], data: b },
    });
    console.log("simple OUTPUT0:", Array.from(result.outputs.OUTPUT0!.data as Int32Array).join(" "));

    process.stdout.write("generation: ");
    for await (const chunk of client.generate(model, "Once upon a time", { maxNewTokens: 16 })) {
      process.stdout.write(chunk.text);
      if (chunk.finishReason) console.log(`\n[${chunk.finishReason}, ${chunk.usage?.completionTokens} tokens]`);
    }
  } catch (error) {
    if (!(error instanceof SluiceError)) throw error;
    console.error(`\n${error.codeName}: ${error.details} (request id ${error.requestId})`);
    process.exitCode = 1;
  } finally {
    client.close();
  }
}

void main();
