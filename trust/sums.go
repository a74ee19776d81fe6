// Package trust holds what vouches for a bundle: SHA256SUMS, written beside
// the bundles at build time and read back by verify and apply.
//
// A SHA256SUMS line ("<hex>  <name>", as sha256sum writes it) vouches for
// every byte of the named file. The comment lines "# airadm manifest <name>
// <digest>", which sha256sum -c skips, vouch for the bundle's manifest, so a
// bundle can also be authenticated by its manifest digest alone
// (--manifest-digest), for example when only that digest travels by a
// trusted path.
package trust

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"airadm.dev/airadm/atomicfile"
)

// SumsFile is the name of the file beside the bundles.
const SumsFile = "SHA256SUMS"

const manifestPrefix = "# airadm manifest "

// Sum is what SHA256SUMS says of one file.
type Sum struct {
	// File is the hex sha256 of the whole file; empty if only the
	// manifest is listed.
	File string
	// Manifest is the bundle's manifest digest ("sha256:<hex>"), if listed.
	Manifest string
}

// Sums is the content of one SHA256SUMS, by file name.
type Sums map[string]Sum

// ReadSums reads path. A missing file is fs.ErrNotExist (wrapped).
func ReadSums(path string) (Sums, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", path, err)
	}
	return ParseSums(string(b)), nil
}

// ParseSums reads sha256sum lines and airadm's manifest comment lines; any
// other line is ignored, as sha256sum -c ignores comments.
func ParseSums(s string) Sums {
	out := Sums{}
	for _, line := range strings.Split(s, "\n") {
		if rest, ok := strings.CutPrefix(line, manifestPrefix); ok {
			if name, d, ok := strings.Cut(rest, " "); ok {
				e := out[name]
				e.Manifest = d
				out[name] = e
			}
			continue
		}
		if strings.HasPrefix(line, "#") {
			continue
		}
		// sha256sum writes "<hex>  <name>", or "<hex> *<name>" in binary mode.
		if sum, name, ok := strings.Cut(line, " "); ok && len(sum) == 64 && len(name) > 1 && (name[0] == ' ' || name[0] == '*') {
			e := out[name[1:]]
			e.File = strings.ToLower(sum)
			out[name[1:]] = e
		}
	}
	return out
}

// Names returns the listed file names, sorted.
func (s Sums) Names() []string {
	names := make([]string, 0, len(s))
	for n := range s {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// Encode renders the file: sha256sum-compatible lines first, then the
// manifest comment lines, each group sorted by name.
func (s Sums) Encode() []byte {
	var b strings.Builder
	names := s.Names()
	for _, n := range names {
		if s[n].File != "" {
			fmt.Fprintf(&b, "%s  %s\n", s[n].File, n)
		}
	}
	for _, n := range names {
		if s[n].Manifest != "" {
			fmt.Fprintf(&b, "%s%s %s\n", manifestPrefix, n, s[n].Manifest)
		}
	}
	return []byte(b.String())
}

// Write replaces path atomically; with no lines left, it removes it.
func (s Sums) Write(path string) error {
	if len(s) == 0 {
		if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("removing %s: %w", path, err)
		}
		return atomicfile.SyncDir(filepath.Dir(path))
	}
	return atomicfile.Write(path, s.Encode(), 0o644)
}

// Clone copies s.
func (s Sums) Clone() Sums {
	out := make(Sums, len(s))
	for k, v := range s {
		out[k] = v
	}
	return out
}
