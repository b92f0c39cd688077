// Package gossipkey makes, parses and reads the shared keys that encrypt
// tether's gossip (memberlist's AES-GCM keyring).
//
// A key is 32 random bytes, base64 encoded (standard encoding, as printed by
// tether keygen); 16- and 24-byte keys are accepted too (AES-128/192). A
// keyring file holds one key per line, the first being the primary key used
// to encrypt; the others are only tried for decryption, which is how a key
// is rotated: add the new key second everywhere, move it first everywhere,
// then remove the old one. Blank lines and lines starting with '#' are
// ignored.
package gossipkey
