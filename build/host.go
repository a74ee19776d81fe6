package build

import (
	"context"
	"errors"
	"fmt"
	"path"
	"sort"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"airadm.dev/airadm/bundle"
	"airadm.dev/airadm/render"
)

// hostFiles fetches the sources of [host] that nodes of the given roles
// need into the cache, each once, unpacks the archives, and returns each
// role's host files. Every problem (a missing file, an unreachable URL, a
// digest mismatch, a hostile archive, two sources claiming one path) is an
// InputError naming the source, and all of them are reported together.
func hostFiles(ctx context.Context, c *render.Cluster, f *bundle.Fetcher, roles []render.Role) (map[render.Role][]bundle.StoredFile, error) {
	var problems []string
	fetched := map[string]bool{} // source+digest fetched without error
	fetch := func(s render.HostSource) bool {
		key := s.Location + "\x00" + s.SHA256
		if ok, done := fetched[key]; done {
			return ok
		}
		_, err := f.Fetch(ctx, s.Location, s.SHA256)
		if err != nil {
			if ctx.Err() != nil {
				return false
			}
			problems = append(problems, err.Error())
		}
		fetched[key] = err == nil
		return err == nil
	}
	type origin struct {
		file bundle.StoredFile
		from string
	}
	byRole := map[render.Role]map[string]origin{}
	add := func(r render.Role, o origin) {
		if byRole[r] == nil {
			byRole[r] = map[string]origin{}
		}
		if prev, dup := byRole[r][o.file.Path]; dup {
			problems = append(problems, fmt.Sprintf("host file %s comes from both %s and %s", o.file.Path, prev.from, o.from))
			return
		}
		byRole[r][o.file.Path] = o
	}
	for i, hf := range c.HostFiles {
		if !forAny(hf.Roles, roles) || !fetch(hf.HostSource) {
			continue
		}
		h := v1.Hash{Algorithm: "sha256", Hex: hf.SHA256}
		size, _ := f.Fetch(ctx, hf.Location, hf.SHA256) // cached now: no I/O but a stat
		for _, r := range hf.Roles {
			add(r, origin{bundle.StoredFile{Path: hf.Path, Mode: hf.Mode, Digest: h, Size: size}, fmt.Sprintf("host.files[%d] (%s)", i, hf.Location)})
		}
	}
	unpacked := map[string][]bundle.UnpackedFile{}
	for i, ha := range c.HostArchives {
		if !forAny(ha.Roles, roles) || !fetch(ha.HostSource) {
			continue
		}
		key := fmt.Sprintf("%s-%d", ha.SHA256, ha.Strip)
		files, ok := unpacked[key]
		if !ok {
			var err error
			if files, err = f.Unpack(ha.SHA256, ha.Strip); err != nil {
				problems = append(problems, fmt.Sprintf("unpacking %s: %v", ha.Location, err))
				continue
			}
			unpacked[key] = files
		}
		from := fmt.Sprintf("host.archives[%d] (%s)", i, ha.Location)
		for _, u := range files {
			p := path.Join(ha.Dir, u.Name)
			if why := render.HostPathProblem(p); why != "" {
				problems = append(problems, fmt.Sprintf("unpacking %s: entry %s: %s", ha.Location, u.Name, why))
				continue
			}
			if !ustarName(p) {
				problems = append(problems, fmt.Sprintf("unpacking %s: entry %s: %s is too long for a bundle entry", ha.Location, u.Name, p))
				continue
			}
			for _, r := range ha.Roles {
				add(r, origin{bundle.StoredFile{Path: p, Mode: u.Mode, Digest: u.Digest, Size: u.Size}, from})
			}
		}
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("fetching host files: %w", err)
	}
	out := map[render.Role][]bundle.StoredFile{}
	for r, files := range byRole {
		for p, o := range files {
			out[r] = append(out[r], o.file)
			// A file where another needs a directory would fail on the host.
			for d := path.Dir(p); d != "/"; d = path.Dir(d) {
				if other, ok := files[d]; ok {
					problems = append(problems, fmt.Sprintf("host file %s from %s is where %s from %s needs a directory", d, other.from, p, o.from))
				}
			}
		}
		sort.Slice(out[r], func(i, j int) bool { return out[r][i].Path < out[r][j].Path })
	}
	if len(problems) > 0 {
		sort.Strings(problems)
		problems = compact(problems)
		return nil, &InputError{errors.New(strings.Join(problems, "; "))}
	}
	return out, nil
}

func forAny(have, want []render.Role) bool {
	for _, r := range have {
		for _, w := range want {
			if r == w {
				return true
			}
		}
	}
	return false
}

func compact(s []string) []string {
	var out []string
	for i, v := range s {
		if i == 0 || v != s[i-1] {
			out = append(out, v)
		}
	}
	return out
}

// ustarName reports whether a host path fits a bundle's ustar entry name:
// whole in 100 bytes, or split at a '/' into at most 155 and 100.
func ustarName(hostPath string) bool {
	name := "files" + hostPath
	if len(name) <= 100 {
		return true
	}
	i := strings.LastIndexByte(name[:min(len(name), 156)], '/')
	return i > 0 && len(name)-i-1 <= 100
}
