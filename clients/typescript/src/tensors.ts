/**
 * Open Inference Protocol tensors <-> raw contents: numbers little-endian and row-major,
 * BYTES elements a 4-byte little-endian length followed by the bytes. FP16 and BF16 travel
 * as their 16-bit words (a Uint16Array), BOOL as one byte per element (a Uint8Array).
 */

export type Datatype =
  | "BOOL" | "UINT8" | "UINT16" | "UINT32" | "UINT64"
  | "INT8" | "INT16" | "INT32" | "INT64"
  | "FP16" | "FP32" | "FP64" | "BF16" | "BYTES";

export type NumericArray =
  | Uint8Array | Uint16Array | Uint32Array | BigUint64Array
  | Int8Array | Int16Array | Int32Array | BigInt64Array
  | Float32Array | Float64Array;

/** A tensor: its datatype, its shape and its elements in row-major order. */
export interface Tensor {
  datatype: Datatype;
  shape: number[];
  data: NumericArray | Uint8Array[];
}

/** What `infer` takes per input: the datatype may be left to the array's type. */
export interface TensorInput {
  datatype?: Datatype;
  shape: number[];
  data: NumericArray | (Uint8Array | string)[];
}

type ArrayType = { BYTES_PER_ELEMENT: number; new (buffer: ArrayBuffer): NumericArray };

const ARRAYS: Record<Exclude<Datatype, "BYTES">, ArrayType> = {
  BOOL: Uint8Array, UINT8: Uint8Array, UINT16: Uint16Array, UINT32: Uint32Array,
  UINT64: BigUint64Array, INT8: Int8Array, INT16: Int16Array, INT32: Int32Array,
  INT64: BigInt64Array, FP16: Uint16Array, FP32: Float32Array, FP64: Float64Array,
  BF16: Uint16Array,
};

const BY_ARRAY = new Map<unknown, Datatype>([
  [Uint8Array, "UINT8"], [Uint16Array, "UINT16"], [Uint32Array, "UINT32"],
  [BigUint64Array, "UINT64"], [Int8Array, "INT8"], [Int16Array, "INT16"],
  [Int32Array, "INT32"], [BigInt64Array, "INT64"], [Float32Array, "FP32"],
  [Float64Array, "FP64"],
]);

if (new Uint8Array(new Uint16Array([1]).buffer)[0] !== 1) {
  throw new Error("this client encodes tensors on little-endian machines only");
}

/** The datatype an input names, or the one its array type implies. */
export function datatypeOf(input: TensorInput): Datatype {
  if (input.datatype !== undefined) return input.datatype;
  if (Array.isArray(input.data)) return "BYTES";
  const datatype = BY_ARRAY.get(input.data.constructor);
  if (datatype === undefined) throw new TypeError("unsupported tensor array type");
  return datatype;
}

export function toRaw(input: TensorInput, datatype: Datatype): Buffer {
  if (Array.isArray(input.data)) {
    const parts: Buffer[] = [];
    for (const item of input.data) {
      const bytes = typeof item === "string" ? Buffer.from(item, "utf8") : Buffer.from(item);
      const length = Buffer.alloc(4);
      length.writeUInt32LE(bytes.length);
      parts.push(length, bytes);
    }
    return Buffer.concat(parts);
  }
  if (datatype === "BYTES") throw new TypeError("BYTES tensors take an array of strings or bytes");
  const data = input.data;
  return Buffer.from(data.buffer, data.byteOffset, data.byteLength);
}

export function fromRaw(raw: Uint8Array, datatype: string, shape: number[]): Tensor {
  const count = shape.reduce((n, d) => n * d, 1);
  if (datatype === "BYTES") {
    return { datatype, shape, data: splitBytes(raw, count) };
  }
  const type = ARRAYS[datatype as Exclude<Datatype, "BYTES">];
  if (type === undefined) throw new TypeError(`unknown datatype ${datatype}`);
  if (raw.byteLength !== count * type.BYTES_PER_ELEMENT) {
    throw new RangeError(`${raw.byteLength} bytes do not hold ${count} ${datatype} elements`);
  }
  // A copy: the response buffer need not be aligned for the element size.
  const copy = new Uint8Array(raw.byteLength);
  copy.set(raw);
  return { datatype: datatype as Datatype, shape, data: new type(copy.buffer) };
}

function splitBytes(raw: Uint8Array, count: number): Uint8Array[] {
  const view = Buffer.from(raw.buffer, raw.byteOffset, raw.byteLength);
  const items: Uint8Array[] = [];
  let offset = 0;
  for (let i = 0; i < count; i++) {
    if (offset + 4 > view.length) throw new RangeError(`BYTES data ends after ${i} elements`);
    const length = view.readUInt32LE(offset);
    offset += 4;
    if (offset + length > view.length) throw new RangeError(`BYTES element ${i} is cut short`);
    items.push(view.subarray(offset, offset + length));
    offset += length;
  }
  if (offset !== view.length) throw new RangeError("BYTES data has bytes left over");
  return items;
}
