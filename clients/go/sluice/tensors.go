package sluice

import (
	"bytes"
	"encoding/binary"
	"fmt"
)

// Tensor is an Open Inference Protocol tensor. Data is a slice of the datatype's Go type:
// []bool (BOOL), []uint8 ... []uint64, []int8 ... []int64, []float32 (FP32), []float64
// (FP64), []uint16 words (FP16, BF16) or [][]byte (BYTES; []string is accepted as input).
// Elements are in row-major order.
type Tensor struct {
	Datatype string
	Shape    []int64
	Data     interface{}
}

var datatypeOf = map[string]string{
	"[]bool": "BOOL", "[]uint8": "UINT8", "[]uint16": "UINT16", "[]uint32": "UINT32",
	"[]uint64": "UINT64", "[]int8": "INT8", "[]int16": "INT16", "[]int32": "INT32",
	"[]int64": "INT64", "[]float32": "FP32", "[]float64": "FP64", "[][]uint8": "BYTES",
	"[]string": "BYTES",
}

// datatype is the tensor's Datatype, or the one its Data's type implies.
func (t Tensor) datatype() (string, error) {
	if t.Datatype != "" {
		return t.Datatype, nil
	}
	if name, ok := datatypeOf[fmt.Sprintf("%T", t.Data)]; ok {
		return name, nil
	}
	return "", fmt.Errorf("sluice: no datatype for tensor data of type %T", t.Data)
}

// raw encodes the data as raw contents: little-endian numbers, length-prefixed BYTES.
func (t Tensor) raw() ([]byte, error) {
	var buf bytes.Buffer
	switch data := t.Data.(type) {
	case [][]byte:
		for _, item := range data {
			_ = binary.Write(&buf, binary.LittleEndian, uint32(len(item)))
			buf.Write(item)
		}
	case []string:
		for _, item := range data {
			_ = binary.Write(&buf, binary.LittleEndian, uint32(len(item)))
			buf.WriteString(item)
		}
	default:
		if err := binary.Write(&buf, binary.LittleEndian, data); err != nil {
			return nil, fmt.Errorf("sluice: cannot encode tensor data of type %T: %w", data, err)
		}
	}
	return buf.Bytes(), nil
}

// fromRaw decodes raw contents of a datatype and shape into a Tensor.
func fromRaw(raw []byte, datatype string, shape []int64) (Tensor, error) {
	count := 1
	for _, dim := range shape {
		count *= int(dim)
	}
	t := Tensor{Datatype: datatype, Shape: shape}
	if datatype == "BYTES" {
		items, err := splitBytes(raw, count)
		t.Data = items
		return t, err
	}
	data, err := makeSlice(datatype, count)
	if err != nil {
		return t, err
	}
	if size := binary.Size(data); size != len(raw) {
		return t, fmt.Errorf("sluice: %d bytes do not hold %d %s elements", len(raw), count, datatype)
	}
	t.Data = data
	return t, binary.Read(bytes.NewReader(raw), binary.LittleEndian, data)
}

func makeSlice(datatype string, n int) (interface{}, error) {
	switch datatype {
	case "BOOL":
		return make([]bool, n), nil
	case "UINT8":
		return make([]uint8, n), nil
	case "UINT16", "FP16", "BF16":
		return make([]uint16, n), nil
	case "UINT32":
		return make([]uint32, n), nil
	case "UINT64":
		return make([]uint64, n), nil
	case "INT8":
		return make([]int8, n), nil
	case "INT16":
		return make([]int16, n), nil
	case "INT32":
		return make([]int32, n), nil
	case "INT64":
		return make([]int64, n), nil
	case "FP32":
		return make([]float32, n), nil
	case "FP64":
		return make([]float64, n), nil
	}
	return nil, fmt.Errorf("sluice: unknown datatype %q", datatype)
}

func splitBytes(raw []byte, count int) ([][]byte, error) {
	items := make([][]byte, 0, count)
	for i := 0; i < count; i++ {
		if len(raw) < 4 {
			return nil, fmt.Errorf("sluice: BYTES data ends after %d of %d elements", i, count)
		}
		n := int(binary.LittleEndian.Uint32(raw))
		if len(raw)-4 < n {
			return nil, fmt.Errorf("sluice: BYTES element %d is cut short", i)
		}
		items = append(items, raw[4:4+n])
		raw = raw[4+n:]
	}
	if len(raw) != 0 {
		return nil, fmt.Errorf("sluice: BYTES data has %d bytes left over", len(raw))
	}
	return items, nil
}
