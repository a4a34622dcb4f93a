package pfclient

// A small msgpack encoder and decoder: exactly what docs/protocol.md needs (maps with string
// keys, str, bin, ints, floats, bools, nil, arrays), nothing else, standard library only.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"sort"
	"strings"
	"unicode/utf8"
)

// maxDepth bounds the nesting the decoder accepts (the daemon's messages are shallow).
const maxDepth = 64

var errTruncated = errors.New("msgpack: truncated")

// appendValue appends v as msgpack. Strings that are not valid UTF-8 are sent with U+FFFD in
// place of the bad bytes (the daemon would refuse them otherwise).
func appendValue(b []byte, v any) ([]byte, error) {
	switch x := v.(type) {
	case nil:
		return append(b, 0xc0), nil
	case bool:
		if x {
			return append(b, 0xc3), nil
		}
		return append(b, 0xc2), nil
	case int:
		return appendInt(b, int64(x)), nil
	case int8:
		return appendInt(b, int64(x)), nil
	case int16:
		return appendInt(b, int64(x)), nil
	case int32:
		return appendInt(b, int64(x)), nil
	case int64:
		return appendInt(b, x), nil
	case uint:
		return appendUint(b, uint64(x)), nil
	case uint8:
		return appendUint(b, uint64(x)), nil
	case uint16:
		return appendUint(b, uint64(x)), nil
	case uint32:
		return appendUint(b, uint64(x)), nil
	case uint64:
		return appendUint(b, x), nil
	case float32:
		return appendFloat(b, float64(x)), nil
	case float64:
		return appendFloat(b, x), nil
	case string:
		return appendString(b, x), nil
	case []byte:
		return appendBin(b, x), nil
	case []string:
		b = appendArrayHeader(b, len(x))
		for _, s := range x {
			b = appendString(b, s)
		}
		return b, nil
	case [][]byte:
		b = appendArrayHeader(b, len(x))
		for _, s := range x {
			b = appendBin(b, s)
		}
		return b, nil
	case []any:
		b = appendArrayHeader(b, len(x))
		var err error
		for _, e := range x {
			if b, err = appendValue(b, e); err != nil {
				return nil, err
			}
		}
		return b, nil
	case map[string]any:
		return appendMap(b, x)
	default:
		return nil, fmt.Errorf("msgpack: cannot encode %T", v)
	}
}

// appendMap writes m with its keys sorted, so that one map always gives the same bytes.
func appendMap(b []byte, m map[string]any) ([]byte, error) {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	n := len(keys)
	switch {
	case n < 16:
		b = append(b, 0x80|byte(n))
	case n <= math.MaxUint16:
		b = append(b, 0xde, byte(n>>8), byte(n))
	default:
		b = append(b, 0xdf)
		b = binary.BigEndian.AppendUint32(b, uint32(n))
	}
	var err error
	for _, k := range keys {
		b = appendString(b, k)
		if b, err = appendValue(b, m[k]); err != nil {
			return nil, err
		}
	}
	return b, nil
}

func appendInt(b []byte, x int64) []byte {
	if x >= 0 {
		return appendUint(b, uint64(x))
	}
	switch {
	case x >= -32:
		return append(b, byte(x))
	case x >= math.MinInt8:
		return append(b, 0xd0, byte(x))
	case x >= math.MinInt16:
		return append(b, 0xd1, byte(x>>8), byte(x))
	case x >= math.MinInt32:
		b = append(b, 0xd2)
		return binary.BigEndian.AppendUint32(b, uint32(x))
	default:
		b = append(b, 0xd3)
		return binary.BigEndian.AppendUint64(b, uint64(x))
	}
}

func appendUint(b []byte, x uint64) []byte {
	switch {
	case x < 128:
		return append(b, byte(x))
	case x <= math.MaxUint8:
		return append(b, 0xcc, byte(x))
	case x <= math.MaxUint16:
		return append(b, 0xcd, byte(x>>8), byte(x))
	case x <= math.MaxUint32:
		b = append(b, 0xce)
		return binary.BigEndian.AppendUint32(b, uint32(x))
	default:
		b = append(b, 0xcf)
		return binary.BigEndian.AppendUint64(b, x)
	}
}

func appendFloat(b []byte, x float64) []byte {
	b = append(b, 0xcb)
	return binary.BigEndian.AppendUint64(b, math.Float64bits(x))
}

func appendString(b []byte, s string) []byte {
	if !utf8.ValidString(s) {
		s = strings.ToValidUTF8(s, "\uFFFD")
	}
	n := len(s)
	switch {
	case n < 32:
		b = append(b, 0xa0|byte(n))
	case n <= math.MaxUint8:
		b = append(b, 0xd9, byte(n))
	case n <= math.MaxUint16:
		b = append(b, 0xda, byte(n>>8), byte(n))
	default:
		b = append(b, 0xdb)
		b = binary.BigEndian.AppendUint32(b, uint32(n))
	}
	return append(b, s...)
}

func appendBin(b []byte, p []byte) []byte {
	n := len(p)
	switch {
	case n <= math.MaxUint8:
		b = append(b, 0xc4, byte(n))
	case n <= math.MaxUint16:
		b = append(b, 0xc5, byte(n>>8), byte(n))
	default:
		b = append(b, 0xc6)
		b = binary.BigEndian.AppendUint32(b, uint32(n))
	}
	return append(b, p...)
}

func appendArrayHeader(b []byte, n int) []byte { return appendContainerHeader(b, n, 0x90, 0xdc) }

func appendMapHeader(b []byte, n int) []byte { return appendContainerHeader(b, n, 0x80, 0xde) }

// appendContainerHeader writes an array or map header: fix (n < 16), 16 or 32 bits; the 32-bit
// code follows the 16-bit one (0xdc/0xdd arrays, 0xde/0xdf maps).
func appendContainerHeader(b []byte, n int, fix, code16 byte) []byte {
	switch {
	case n < 16:
		return append(b, fix|byte(n))
	case n <= math.MaxUint16:
		return append(b, code16, byte(n>>8), byte(n))
	default:
		b = append(b, code16+1)
		return binary.BigEndian.AppendUint32(b, uint32(n))
	}
}

// decodeOne decodes exactly one msgpack object filling all of p. Maps come back as
// map[string]any (a non-string key is an error), ints as int64 (uint64 above MaxInt64),
// floats as float64, str as string, bin as []byte, arrays as []any. Ext types are errors.
func decodeOne(p []byte) (any, error) {
	d := decoder{p: p}
	v, err := d.value(0)
	if err != nil {
		return nil, err
	}
	if d.i != len(p) {
		return nil, fmt.Errorf("msgpack: %d trailing bytes", len(p)-d.i)
	}
	return v, nil
}

type decoder struct {
	p []byte
	i int
}

func (d *decoder) take(n int) ([]byte, error) {
	if n < 0 || len(d.p)-d.i < n {
		return nil, errTruncated
	}
	s := d.p[d.i : d.i+n]
	d.i += n
	return s, nil
}

func (d *decoder) uint(n int) (uint64, error) {
	s, err := d.take(n)
	if err != nil {
		return 0, err
	}
	var x uint64
	for _, c := range s {
		x = x<<8 | uint64(c)
	}
	return x, nil
}

func (d *decoder) value(depth int) (any, error) {
	if depth > maxDepth {
		return nil, errors.New("msgpack: nested too deep")
	}
	s, err := d.take(1)
	if err != nil {
		return nil, err
	}
	c := s[0]
	switch {
	case c <= 0x7f:
		return int64(c), nil
	case c >= 0xe0:
		return int64(int8(c)), nil
	case c&0xf0 == 0x80:
		return d.mapBody(int(c&0x0f), depth)
	case c&0xf0 == 0x90:
		return d.arrayBody(int(c&0x0f), depth)
	case c&0xe0 == 0xa0:
		return d.str(int(c & 0x1f))
	}
	switch c {
	case 0xc0:
		return nil, nil
	case 0xc2:
		return false, nil
	case 0xc3:
		return true, nil
	case 0xc4, 0xc5, 0xc6:
		n, err := d.uint(1 << (c - 0xc4))
		if err != nil {
			return nil, err
		}
		raw, err := d.take(int(n))
		if err != nil {
			return nil, err
		}
		return append([]byte(nil), raw...), nil
	case 0xca:
		x, err := d.uint(4)
		return float64(math.Float32frombits(uint32(x))), err
	case 0xcb:
		x, err := d.uint(8)
		return math.Float64frombits(x), err
	case 0xcc, 0xcd, 0xce, 0xcf:
		x, err := d.uint(1 << (c - 0xcc))
		if err != nil {
			return nil, err
		}
		if x > math.MaxInt64 {
			return x, nil
		}
		return int64(x), nil
	case 0xd0:
		x, err := d.uint(1)
		return int64(int8(x)), err
	case 0xd1:
		x, err := d.uint(2)
		return int64(int16(x)), err
	case 0xd2:
		x, err := d.uint(4)
		return int64(int32(x)), err
	case 0xd3:
		x, err := d.uint(8)
		return int64(x), err
	case 0xd9, 0xda, 0xdb:
		n, err := d.uint(1 << (c - 0xd9))
		if err != nil {
			return nil, err
		}
		return d.str(int(n))
	case 0xdc, 0xdd:
		n, err := d.uint(2 << (c - 0xdc))
		if err != nil {
			return nil, err
		}
		return d.arrayBody(int(n), depth)
	case 0xde, 0xdf:
		n, err := d.uint(2 << (c - 0xde))
		if err != nil {
			return nil, err
		}
		return d.mapBody(int(n), depth)
	}
	return nil, fmt.Errorf("msgpack: type byte 0x%02x is not supported", c)
}

func (d *decoder) str(n int) (string, error) {
	raw, err := d.take(n)
	if err != nil {
		return "", err
	}
	return strings.ToValidUTF8(string(raw), "\uFFFD"), nil
}

func (d *decoder) arrayBody(n int, depth int) (any, error) {
	if n > len(d.p)-d.i { // each element takes at least one byte
		return nil, errTruncated
	}
	out := make([]any, n)
	for k := range out {
		v, err := d.value(depth + 1)
		if err != nil {
			return nil, err
		}
		out[k] = v
	}
	return out, nil
}

func (d *decoder) mapBody(n int, depth int) (any, error) {
	if n > (len(d.p)-d.i)/2 {
		return nil, errTruncated
	}
	out := make(map[string]any, n)
	for k := 0; k < n; k++ {
		key, err := d.value(depth + 1)
		if err != nil {
			return nil, err
		}
		ks, ok := key.(string)
		if !ok {
			return nil, fmt.Errorf("msgpack: map key of type %T", key)
		}
		v, err := d.value(depth + 1)
		if err != nil {
			return nil, err
		}
		out[ks] = v
	}
	return out, nil
}
