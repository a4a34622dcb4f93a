package pfclient

// Reflection and loose conversions: reading the bot's values without importing the bot.

import (
	"fmt"
	"math"
	"reflect"
)

// structFields are the exported fields of v (a struct or a pointer to one) by name; nil for
// anything else, including a nil pointer.
func structFields(v any) map[string]reflect.Value {
	rv := reflect.ValueOf(v)
	for rv.Kind() == reflect.Pointer || rv.Kind() == reflect.Interface {
		if rv.IsNil() {
			return nil
		}
		rv = rv.Elem()
	}
	if rv.Kind() != reflect.Struct {
		return nil
	}
	t := rv.Type()
	out := make(map[string]reflect.Value, t.NumField())
	for i := 0; i < t.NumField(); i++ {
		if f := t.Field(i); f.IsExported() {
			out[f.Name] = rv.Field(i)
		}
	}
	return out
}

func indirect(v any) reflect.Value {
	rv := reflect.ValueOf(v)
	for rv.Kind() == reflect.Pointer || rv.Kind() == reflect.Interface {
		if rv.IsNil() {
			return reflect.Value{}
		}
		rv = rv.Elem()
	}
	return rv
}

func asInt64(v any) (int64, bool) {
	rv := indirect(v)
	switch rv.Kind() {
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		return rv.Int(), true
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64, reflect.Uintptr:
		u := rv.Uint()
		if u > math.MaxInt64 {
			return math.MaxInt64, true
		}
		return int64(u), true
	case reflect.Float32, reflect.Float64:
		f := rv.Float()
		if math.IsNaN(f) || math.IsInf(f, 0) || f >= math.MaxInt64 || f <= math.MinInt64 {
			return 0, false
		}
		return int64(f), true
	}
	return 0, false
}

func asFloat64(v any) (float64, bool) {
	rv := indirect(v)
	switch rv.Kind() {
	case reflect.Float32, reflect.Float64:
		f := rv.Float()
		if math.IsNaN(f) || math.IsInf(f, 0) {
			return 0, false
		}
		return f, true
	}
	if n, ok := asInt64(v); ok {
		return float64(n), true
	}
	return 0, false
}

// asString renders any value as text: strings (named string types too) as they are,
// durations and times readably, errors by their message, the rest with %v.
func asString(v any) string {
	switch x := v.(type) {
	case nil:
		return ""
	case string:
		return x
	case []byte:
		return string(x)
	case error:
		return x.Error()
	case fmt.Stringer:
		return x.String()
	}
	rv := indirect(v)
	if rv.Kind() == reflect.String {
		return rv.String()
	}
	if !rv.IsValid() {
		return ""
	}
	return fmt.Sprintf("%v", rv.Interface())
}

func asBytes(v any) ([]byte, bool) {
	if b, ok := v.([]byte); ok {
		return b, true
	}
	rv := indirect(v)
	if rv.Kind() == reflect.Slice && rv.Type().Elem().Kind() == reflect.Uint8 {
		return rv.Bytes(), true
	}
	if rv.Kind() == reflect.String {
		return []byte(rv.String()), true
	}
	return nil, false
}

func asStrings(v any) []string {
	rv := indirect(v)
	if rv.Kind() != reflect.Slice && rv.Kind() != reflect.Array {
		return nil
	}
	out := make([]string, 0, rv.Len())
	for i := 0; i < rv.Len(); i++ {
		if s := asString(rv.Index(i).Interface()); s != "" {
			out = append(out, s)
		}
	}
	return out
}
