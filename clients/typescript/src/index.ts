export {
  type CallOptions,
  type ClientOptions,
  DEFAULT_ADDRESS,
  DEFAULT_RETRY,
  type FinishReasonName,
  type GenerateChunk,
  type GenerateOptions,
  type GenerateResult,
  type InferOptions,
  type InferResult,
  type ModelVersionStatus,
  type RepositoryModel,
  type RetryPolicy,
  serviceConfig,
  SluiceClient,
  type TlsOptions,
  tlsChannel,
} from "./client";
export { PUSHBACK_KEY, REQUEST_ID_KEY, SluiceError } from "./errors";
export type { HealthStatus } from "./health";
export type { Datatype, NumericArray, Tensor, TensorInput } from "./tensors";
export { status } from "@grpc/grpc-js";
