import {
  type CallOptions as GrpcCallOptions,
  type ChannelCredentials,
  type ChannelOptions,
  type ClientUnaryCall,
  credentials as grpcCredentials,
  Metadata,
  type ServiceError,
} from "@grpc/grpc-js";
import { readFileSync } from "node:fs";

import { toSluiceError } from "./errors";
import { GRPCInferenceServiceClient, type ModelInferRequest } from "./gen/inference/grpc_service";
import type { ModelConfig } from "./gen/inference/model_config";
import {
  FinishReason,
  type GenerateRequest,
  type GenerateResponse,
  GenerationServiceClient,
} from "./gen/sluice/v1/generation_service";
import {
  BreakerState,
  ModelServiceClient,
  ModelState,
  type GetCapabilitiesResponse,
} from "./gen/sluice/v1/model_service";
import { CHECK_PATH, decodeCheckResponse, encodeCheckRequest, type HealthStatus } from "./health";
import { datatypeOf, fromRaw, type Tensor, type TensorInput, toRaw } from "./tensors";

/** Where `sluice serve` listens by default. */
export const DEFAULT_ADDRESS = "127.0.0.1:8001";
const SERVICES = ["inference.GRPCInferenceService", "sluice.v1.ModelService", "sluice.v1.GenerationService"];

/** How gRPC retries calls that end UNAVAILABLE, inside their deadline; a server's
 * `grpc-retry-pushback-ms` replaces the random back-off. */
export interface RetryPolicy {
  /** Attempts in all, the first one included (gRPC clamps this to 5). */
  maxAttempts: number;
  initialBackoffMs: number;
  maxBackoffMs: number;
  backoffMultiplier: number;
}

export const DEFAULT_RETRY: RetryPolicy = {
  maxAttempts: 4,
  initialBackoffMs: 100,
  maxBackoffMs: 2000,
  backoffMultiplier: 2,
};

/** TLS for the client's channel; PEM files, read when the client is made. */
export interface TlsOptions {
  /** The CAs that signed the server's certificate (default: Node's root CAs). */
  caFile?: string;
  /** Client certificate chain, for servers that require one (mTLS); with `keyFile`. */
  certFile?: string;
  /** The client certificate's unencrypted private key. */
  keyFile?: string;
  /** Name the server's certificate must carry (and the call authority) when it differs
   * from the address's host, e.g. when connecting by IP address or through a tunnel. */
  serverName?: string;
}

export interface ClientOptions {
  /** Default deadline of every call, in milliseconds (30 s). */
  timeoutMs?: number;
  /** TLS, optionally with a client certificate (default: plaintext). */
  tls?: TlsOptions;
  /** Channel credentials of your own (instead of `tls`). */
  credentials?: ChannelCredentials;
  /** Retries on UNAVAILABLE; `false` turns them off. */
  retry?: RetryPolicy | false;
  /** Largest message sent or received (256 MiB, the server's default). */
  maxMessageBytes?: number;
}

export interface CallOptions {
  /** This call's deadline, in milliseconds from now (default: the client's). */
  timeoutMs?: number;
  /** Aborting cancels the call; it then rejects with the signal's reason. */
  signal?: AbortSignal;
}

export interface InferOptions extends CallOptions {
  /** Outputs to return (default: all). */
  outputs?: string[];
  version?: string;
  /** Echoed back, and names the call in the server's logs. */
  requestId?: string;
}

export interface InferResult {
  model: string;
  version: string;
  id: string;
  outputs: Record<string, Tensor>;
}

export interface GenerateOptions extends CallOptions {
  version?: string;
  /** 0 takes the server's default. */
  maxNewTokens?: number;
  /** 0 (the default) is greedy. */
  temperature?: number;
  topK?: number;
  topP?: number;
  seed?: number | bigint;
  stopSequences?: string[];
  stopTokenIds?: number[];
  repetitionPenalty?: number;
}

export type FinishReasonName = "stop" | "length" | "cancelled" | "error";

export interface GenerateChunk {
  /** Text this chunk adds; the chunks' texts joined are the whole output. */
  text: string;
  tokenIds: number[];
  /** Set on the last chunk only. */
  finishReason?: FinishReasonName;
  /** Set on the last chunk only. */
  usage?: { promptTokens: number; completionTokens: number };
  /** The model and version serving the generation (another one after a fallback). */
  model: string;
  version: string;
  fallbackReason: string;
}

export interface GenerateResult {
  text: string;
  tokenIds: number[];
  finishReason?: FinishReasonName;
  usage?: { promptTokens: number; completionTokens: number };
  model: string;
  version: string;
}

export interface RepositoryModel {
  name: string;
  version: string;
  state: string;
  reason: string;
}

export interface ModelVersionStatus {
  name: string;
  version: string;
  state: "READY" | "UNAVAILABLE" | "UNSPECIFIED";
  reason: string;
  backend: string;
  backendRung: string;
  backendReason: string;
  device: string;
  breakerState: "CLOSED" | "HALF_OPEN" | "OPEN" | "UNSPECIFIED";
  fallbacks: string[];
}

type Callback<Res> = (error: ServiceError | null, response?: Res) => void;
type UnaryMethod<Req, Res> = (
  request: Req,
  metadata: Metadata,
  options: Partial<GrpcCallOptions>,
  callback: Callback<Res>,
) => ClientUnaryCall;

const FINISH_REASONS: Partial<Record<FinishReason, FinishReasonName>> = {
  [FinishReason.FINISH_REASON_STOP]: "stop",
  [FinishReason.FINISH_REASON_LENGTH]: "length",
  [FinishReason.FINISH_REASON_CANCELLED]: "cancelled",
  [FinishReason.FINISH_REASON_ERROR]: "error",
};

/** Channel credentials and options for `tls`. */
export function tlsChannel(tls: TlsOptions): { credentials: ChannelCredentials; options: ChannelOptions } {
  if ((tls.certFile === undefined) !== (tls.keyFile === undefined)) {
    throw new TypeError("tls.certFile and tls.keyFile go together");
  }
  const read = (path?: string): Buffer | null => (path === undefined ? null : readFileSync(path));
  const credentials = grpcCredentials.createSsl(read(tls.caFile), read(tls.keyFile), read(tls.certFile));
  const options: ChannelOptions =
    tls.serverName === undefined
      ? {}
      : { "grpc.ssl_target_name_override": tls.serverName, "grpc.default_authority": tls.serverName };
  return { credentials, options };
}

export function serviceConfig(retry: RetryPolicy): string {
  const seconds = (ms: number): string => `${ms / 1000}s`;
  return JSON.stringify({
    methodConfig: [
      {
        name: SERVICES.map((service) => ({ service })),
        retryPolicy: {
          maxAttempts: retry.maxAttempts,
          initialBackoff: seconds(retry.initialBackoffMs),
          maxBackoff: seconds(retry.maxBackoffMs),
          backoffMultiplier: retry.backoffMultiplier,
          retryableStatusCodes: ["UNAVAILABLE"],
        },
      },
    ],
    retryThrottling: { maxTokens: 100, tokenRatio: 0.1 },
  });
}

/**
 * A client for a Sluice server (or any Open Inference Protocol v2 server, for the inference
 * calls). Every call has a deadline (the client's `timeoutMs`, or the call's own); failed
 * calls reject with `SluiceError`.
 */
export class SluiceClient {
  private readonly inference: GRPCInferenceServiceClient;
  private readonly modelService: ModelServiceClient;
  private readonly generation: GenerationServiceClient;
  private readonly timeoutMs: number;

  constructor(address: string = DEFAULT_ADDRESS, options: ClientOptions = {}) {
    const maxBytes = options.maxMessageBytes ?? 256 * 1024 * 1024;
    const retry = options.retry ?? DEFAULT_RETRY;
    const channelOptions: ChannelOptions = {
      "grpc.max_send_message_length": maxBytes,
      "grpc.max_receive_message_length": maxBytes,
      "grpc.enable_retries": retry === false ? 0 : 1,
      ...(retry === false ? {} : { "grpc.service_config": serviceConfig(retry) }),
    };
    let creds = options.credentials ?? grpcCredentials.createInsecure();
    if (options.tls !== undefined && options.credentials === undefined) {
      const tls = tlsChannel(options.tls);
      creds = tls.credentials;
      Object.assign(channelOptions, tls.options);
    }
    this.inference = new GRPCInferenceServiceClient(address, creds, channelOptions);
    const shared = { channelOverride: this.inference.getChannel() };
    this.modelService = new ModelServiceClient(address, creds, shared);
    this.generation = new GenerationServiceClient(address, creds, shared);
    this.timeoutMs = options.timeoutMs ?? 30_000;
  }

  close(): void {
    this.inference.close();
  }

  private grpcOptions(options: CallOptions): Partial<GrpcCallOptions> {
    return { deadline: Date.now() + (options.timeoutMs ?? this.timeoutMs) };
  }

  private unary<Req, Res>(
    method: UnaryMethod<Req, Res>,
    request: Req,
    options: CallOptions = {},
  ): Promise<Res> {
    const { signal } = options;
    signal?.throwIfAborted();
    return new Promise((resolve, reject) => {
      const call = method(request, new Metadata(), this.grpcOptions(options), (error, response) => {
        signal?.removeEventListener("abort", abort);
        if (error === null) resolve(response as Res);
        else reject(signal?.aborted ? signal.reason : toSluiceError(error));
      });
      const abort = (): void => call.cancel();
      signal?.addEventListener("abort", abort, { once: true });
    });
  }

  /** Whether the server process is up. */
  async live(options?: CallOptions): Promise<boolean> {
    const m = this.inference.serverLive.bind(this.inference);
    return (await this.unary(m, {}, options)).live;
  }

  /** Whether the server can serve inference (start-up done, not draining). */
  async ready(options?: CallOptions): Promise<boolean> {
    const m = this.inference.serverReady.bind(this.inference);
    return (await this.unary(m, {}, options)).ready;
  }

  /** grpc.health.v1 Check: "" is the whole server; `sluice.model.<name>` one model. */
  health(service = "", options?: CallOptions): Promise<HealthStatus> {
    const check: UnaryMethod<string, HealthStatus> = (request, metadata, callOptions, callback) =>
      this.inference.makeUnaryRequest(
        CHECK_PATH, encodeCheckRequest, decodeCheckResponse, request, metadata, callOptions, callback,
      );
    return this.unary(check, service, options);
  }

  async serverMetadata(options?: CallOptions): Promise<{ name: string; version: string; extensions: string[] }> {
    const m = this.inference.serverMetadata.bind(this.inference);
    const { name, version, extensions } = await this.unary(m, {}, options);
    return { name, version, extensions };
  }

  async modelReady(name: string, version = "", options?: CallOptions): Promise<boolean> {
    const m = this.inference.modelReady.bind(this.inference);
    return (await this.unary(m, { name, version }, options)).ready;
  }

  async modelMetadata(name: string, version = "", options?: CallOptions) {
    const m = this.inference.modelMetadata.bind(this.inference);
    const r = await this.unary(m, { name, version }, options);
    const tensors = (ts: typeof r.inputs) =>
      ts.map((t) => ({ name: t.name, datatype: t.datatype, shape: t.shape.map(Number) }));
    return { name: r.name, versions: r.versions, platform: r.platform, inputs: tensors(r.inputs), outputs: tensors(r.outputs) };
  }

  /** The model's Triton-style configuration. */
  async modelConfig(name: string, version = "", options?: CallOptions): Promise<ModelConfig | undefined> {
    const m = this.inference.modelConfig.bind(this.inference);
    return (await this.unary(m, { name, version }, options)).config;
  }

  /** Every model in the repository, one row per version, with its state. */
  async models(options?: CallOptions): Promise<RepositoryModel[]> {
    const m = this.inference.repositoryIndex.bind(this.inference);
    const r = await this.unary(m, { repositoryName: "", ready: false }, options);
    return r.models.map(({ name, version, state, reason }) => ({ name, version, state, reason }));
  }

  /** Every model version with its backend, device and breaker state (sluice.v1.ModelService). */
  async listModels(options?: CallOptions): Promise<ModelVersionStatus[]> {
    const m = this.modelService.listModels.bind(this.modelService);
    const r = await this.unary(m, {}, options);
    return r.models.map((s) => ({
      ...s,
      state: (ModelState[s.state]?.replace("MODEL_STATE_", "") ?? "UNSPECIFIED") as ModelVersionStatus["state"],
      breakerState: (BreakerState[s.breakerState]?.replace("BREAKER_STATE_", "") ??
        "UNSPECIFIED") as ModelVersionStatus["breakerState"],
    }));
  }

  /** What the server's machine offers the backends. */
  capabilities(options?: CallOptions): Promise<GetCapabilitiesResponse> {
    return this.unary(this.modelService.getCapabilities.bind(this.modelService), {}, options);
  }

  async loadModel(name: string, options?: CallOptions): Promise<void> {
    const m = this.inference.repositoryModelLoad.bind(this.inference);
    await this.unary(m, { repositoryName: "", modelName: name, parameters: {} }, options);
  }

  async unloadModel(name: string, options?: CallOptions): Promise<void> {
    const m = this.inference.repositoryModelUnload.bind(this.inference);
    await this.unary(m, { repositoryName: "", modelName: name, parameters: {} }, options);
  }

  /** One inference; each input's datatype follows its array type unless it names one. */
  async infer(model: string, inputs: Record<string, TensorInput>, options: InferOptions = {}): Promise<InferResult> {
    const request: ModelInferRequest = {
      modelName: model,
      modelVersion: options.version ?? "",
      id: options.requestId ?? "",
      parameters: {},
      inputs: [],
      outputs: (options.outputs ?? []).map((name) => ({ name, parameters: {} })),
      rawInputContents: [],
    };
    for (const [name, input] of Object.entries(inputs)) {
      const datatype = datatypeOf(input);
      request.inputs.push({ name, datatype, shape: input.shape.map(BigInt), parameters: {}, contents: undefined });
      request.rawInputContents.push(toRaw(input, datatype));
    }
    const r = await this.unary(this.inference.modelInfer.bind(this.inference), request, options);
    if (r.rawOutputContents.length !== r.outputs.length) {
      throw new RangeError("the response has no raw contents for every output");
    }
    const outputs: Record<string, Tensor> = {};
    r.outputs.forEach((o, i) => {
      outputs[o.name] = fromRaw(r.rawOutputContents[i]!, o.datatype, o.shape.map(Number));
    });
    return { model: r.modelName, version: r.modelVersion, id: r.id, outputs };
  }

  /** Tokens a prompt takes on a model, and the model's context length. */
  async countTokens(model: string, prompt: string, options: CallOptions & { version?: string } = {}) {
    const m = this.generation.countTokens.bind(this.generation);
    const r = await this.unary(m, { modelName: model, modelVersion: options.version ?? "", prompt }, options);
    return { tokenCount: r.tokenCount, maxContext: r.maxContext };
  }

  /**
   * Stream a generation: an async iterable of chunks, the last one with `finishReason` and
   * `usage`. Aborting `signal`, or leaving the loop early, cancels the call on the server.
   */
  async *generate(model: string, prompt: string, options: GenerateOptions = {}): AsyncGenerator<GenerateChunk> {
    const { signal } = options;
    signal?.throwIfAborted();
    const call = this.generation.generate(generateRequest(model, prompt, options), new Metadata(), this.grpcOptions(options));
    const abort = (): void => call.cancel();
    signal?.addEventListener("abort", abort, { once: true });
    try {
      for await (const response of call as AsyncIterable<GenerateResponse>) {
        yield toChunk(response);
      }
    } catch (error) {
      throw signal?.aborted ? signal.reason : toSluiceError(error);
    } finally {
      signal?.removeEventListener("abort", abort);
      call.cancel();
    }
  }

  /** A whole generation at once: the streamed chunks, joined. */
  async generateText(model: string, prompt: string, options: GenerateOptions = {}): Promise<GenerateResult> {
    const result: GenerateResult = { text: "", tokenIds: [], model: "", version: "" };
    for await (const chunk of this.generate(model, prompt, options)) {
      result.text += chunk.text;
      result.tokenIds.push(...chunk.tokenIds);
      result.model = chunk.model;
      result.version = chunk.version;
      result.finishReason = chunk.finishReason ?? result.finishReason;
      result.usage = chunk.usage ?? result.usage;
    }
    return result;
  }
}

function generateRequest(model: string, prompt: string, o: GenerateOptions): GenerateRequest {
  return {
    modelName: model,
    modelVersion: o.version ?? "",
    prompt,
    parameters: {
      maxNewTokens: o.maxNewTokens ?? 0,
      temperature: o.temperature ?? 0,
      topK: o.topK ?? 0,
      topP: o.topP ?? 0,
      seed: o.seed === undefined ? undefined : BigInt(o.seed),
      stopSequences: o.stopSequences ?? [],
      stopTokenIds: o.stopTokenIds ?? [],
      repetitionPenalty: o.repetitionPenalty ?? 0,
    },
  };
}

function toChunk(r: GenerateResponse): GenerateChunk {
  const chunk: GenerateChunk = {
    text: r.text,
    tokenIds: r.tokenIds,
    model: r.modelName,
    version: r.modelVersion,
    fallbackReason: r.fallbackReason,
  };
  const finishReason = FINISH_REASONS[r.finishReason];
  if (finishReason !== undefined) chunk.finishReason = finishReason;
  if (r.usage !== undefined) chunk.usage = { ...r.usage };
  return chunk;
}
