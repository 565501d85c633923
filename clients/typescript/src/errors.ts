import { Metadata, status, type ServiceError } from "@grpc/grpc-js";

/** Trailing metadata key carrying the call's request id. */
export const REQUEST_ID_KEY = "x-request-id";
/** Trailing metadata key of gRFC A6 server pushback, in milliseconds. */
export const PUSHBACK_KEY = "grpc-retry-pushback-ms";

/**
 * A call that ended with a non-OK gRPC status. `code` is the status (`status.NOT_FOUND`,
 * ...), `codeName` its name; UNAVAILABLE calls were already retried by gRPC.
 */
export class SluiceError extends Error {
  readonly code: status;
  readonly codeName: string;
  readonly details: string;
  /** The server's id for the call; quote it in bug reports ("" when none came back). */
  readonly requestId: string;
  /** The server's `grpc-retry-pushback-ms`: wait this long before calling again. */
  readonly retryAfterMs: number | undefined;

  constructor(code: status, details: string, metadata?: Metadata, options?: ErrorOptions) {
    const codeName = status[code] ?? String(code);
    super(details ? `${codeName}: ${details}` : codeName, options);
    this.name = "SluiceError";
    this.code = code;
    this.codeName = codeName;
    this.details = details;
    this.requestId = firstString(metadata, REQUEST_ID_KEY) ?? "";
    const pushback = firstString(metadata, PUSHBACK_KEY);
    this.retryAfterMs = pushback !== undefined && /^\d+$/.test(pushback) ? Number(pushback) : undefined;
  }
}

function firstString(metadata: Metadata | undefined, key: string): string | undefined {
  const value = metadata?.get(key)[0];
  return typeof value === "string" ? value : undefined;
}

function isServiceError(error: unknown): error is ServiceError {
  return error instanceof Error && typeof (error as Partial<ServiceError>).code === "number";
}

/** A grpc-js error as a SluiceError (anything else is returned unchanged). */
export function toSluiceError(error: unknown): unknown {
  if (error instanceof SluiceError || !isServiceError(error)) return error;
  return new SluiceError(error.code, error.details, error.metadata, { cause: error });
}
