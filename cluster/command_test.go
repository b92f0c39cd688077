package cluster

import (
	"errors"
	"fmt"
	"reflect"
	"testing"
	"time"
)

func TestEncodeDecodeRoundTrip(t *testing.T) {
	created := time.Date(2026, 12, 7, 10, 0, 0, 123, time.UTC)
	cmds := []Command{
		CreateVolume{Volume: Volume{Name: "db", Replicas: 2, Primary: "a", ReplicaNodes: []string{"b"}, Epoch: 1, CreatedAt: created}},
		DeleteVolume{Name: "db"},
		SetPrimary{Name: "db", Primary: "b", ReplicaNodes: []string{"a"}, Epoch: 2, ExpectEpoch: 1},
		UpdateProgress{Name: "db", Node: "b", Epoch: 2, Seq: 7, CutUnixNano: created.UnixNano()},
		SetDeleted{Name: "db", DeletedUnixNano: created.UnixNano()},
		Undelete{Name: "db"},
		DeleteVolume{Name: "db", ExpectDeletedUnixNano: created.UnixNano()},
		SetContainer{Volume: "db", Spec: appSpec("app", "a", "db")},
		RemoveContainer{Volume: "db", Name: "app", Node: "a"},
	}
	for _, cmd := range cmds {
		t.Run(fmt.Sprintf("%T", cmd), func(t *testing.T) {
			b, err := Encode(cmd)
			if err != nil {
				t.Fatal(err)
			}
			if CommandType(b[0]&^IgnoreUnknownFlag) != cmd.Type() || b[1] != commandVersion {
				t.Fatalf("envelope = %x %x, want type %d version %d", b[0], b[1], cmd.Type(), commandVersion)
			}
			got, err := Decode(b)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, cmd) {
				t.Fatalf("decoded %#v, want %#v", got, cmd)
			}
		})
	}
}

func TestEncodePointer(t *testing.T) {
	b, err := Encode(&DeleteVolume{Name: "x"})
	if err != nil {
		t.Fatal(err)
	}
	got, err := Decode(b)
	if err != nil || got != (DeleteVolume{Name: "x"}) {
		t.Fatalf("Decode = %#v, %v", got, err)
	}
}

func TestDecodeErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   []byte
		want error
	}{
		{"empty", nil, ErrInvalidCommand},
		{"one byte", []byte{1}, ErrInvalidCommand},
		{"unknown type", []byte{99, 1, '{', '}'}, ErrUnknownCommand},
		{"unknown type with ignore flag", []byte{99 | IgnoreUnknownFlag, 1, '{', '}'}, ErrUnknownCommand},
		{"newer version", []byte{byte(TypeDeleteVolume), commandVersion + 1, '{', '}'}, ErrUnknownCommand},
		{"version zero", []byte{byte(TypeDeleteVolume), 0, '{', '}'}, ErrUnknownCommand},
		{"bad json", []byte{byte(TypeDeleteVolume), 1, '{'}, ErrInvalidCommand},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Decode(tc.in)
			if !errors.Is(err, tc.want) {
				t.Fatalf("Decode error = %v, want %v", err, tc.want)
			}
		})
	}
}

func TestParseError(t *testing.T) {
	if ParseError("") != nil {
		t.Fatal("empty text must give nil")
	}
	orig := fmt.Errorf("%w: %q", ErrVolumeExists, "db")
	got := ParseError(orig.Error())
	if !errors.Is(got, ErrVolumeExists) || got.Error() != orig.Error() {
		t.Fatalf("ParseError = %v, want it to wrap ErrVolumeExists with text %q", got, orig)
	}
	if got := ParseError("something else"); got == nil || got.Error() != "something else" {
		t.Fatalf("ParseError(unknown) = %v", got)
	}
}
