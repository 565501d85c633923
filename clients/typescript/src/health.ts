/**
 * grpc.health.v1 Check messages, encoded by hand (two one-field messages), so the client
 * needs no copy of health.proto.
 */
import { BinaryReader, BinaryWriter } from "@bufbuild/protobuf/wire";

export const CHECK_PATH = "/grpc.health.v1.Health/Check";

export type HealthStatus = "UNKNOWN" | "SERVING" | "NOT_SERVING" | "SERVICE_UNKNOWN";
const STATUSES: HealthStatus[] = ["UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"];

export function encodeCheckRequest(service: string): Buffer {
  const writer = new BinaryWriter();
  if (service !== "") writer.uint32(10).string(service);
  return Buffer.from(writer.finish());
}

export function decodeCheckResponse(data: Buffer): HealthStatus {
  const reader = new BinaryReader(data);
  let value = 0;
  while (reader.pos < reader.len) {
    const [field, wireType] = reader.tag();
    if (field === 1) value = reader.int32();
    else reader.skip(wireType);
  }
  return STATUSES[value] ?? "UNKNOWN";
}
