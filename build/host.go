package build

import (
	"context"
	"errors"
	"fmt"
	"path"
	"slices"
	"sort"
	"strings"
	"sync"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"airadm.dev/airadm/bundle"
	"airadm.dev/airadm/render"
)

// hostFiles fetches the sources of [host] that nodes of the given roles
// need into the cache, each once, unpacks the archives, and returns each
// role's host files. Every problem (a missing file, an unreachable URL, a
// digest mismatch, a hostile archive, two sources claiming one path) is an
// InputError naming the source, and all of them are reported together.
func hostFiles(ctx context.Context, c *render.Cluster, f *bundle.Fetcher, roles []render.Role, jobs int, log func(string, ...any)) (map[render.Role][]bundle.StoredFile, error) {
	var problems []string
	results := prefetch(ctx, c, f, roles, jobs)
	fetch := func(s render.HostSource) (int64, bool) {
		r := results[s]
		if r.err != nil {
			if ctx.Err() == nil {
				problems = append(problems, r.err.Error())
			}
			return 0, false
		}
		if r.fetched {
			log("fetched %s (%d bytes)", s.Location, r.size)
		}
		return r.size, true
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
		if !forAny(hf.Roles, roles) {
			continue
		}
		if !ustarName(hf.Path) {
			problems = append(problems, fmt.Sprintf("host.files[%d]: %s is too long for a bundle entry", i, hf.Path))
			continue
		}
		size, ok := fetch(hf.HostSource)
		if !ok {
			continue
		}
		h := v1.Hash{Algorithm: "sha256", Hex: hf.SHA256}
		for _, r := range hf.Roles {
			add(r, origin{bundle.StoredFile{Path: hf.Path, Mode: hf.Mode, Digest: h, Size: size}, fmt.Sprintf("host.files[%d] (%s)", i, hf.Location)})
		}
	}
	unpacked := map[string][]bundle.UnpackedFile{}
	for i, ha := range c.HostArchives {
		if !forAny(ha.Roles, roles) {
			continue
		}
		if _, ok := fetch(ha.HostSource); !ok {
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

type fetchResult struct {
	size    int64
	fetched bool
	err     error
}

// prefetch fetches every source the roles need, each once, jobs at a time:
// on a cold cache, hashing several sources at once uses every core.
func prefetch(ctx context.Context, c *render.Cluster, f *bundle.Fetcher, roles []render.Role, jobs int) map[render.HostSource]fetchResult {
	var sources []render.HostSource
	for _, hf := range c.HostFiles {
		if forAny(hf.Roles, roles) && !slices.Contains(sources, hf.HostSource) {
			sources = append(sources, hf.HostSource)
		}
	}
	for _, ha := range c.HostArchives {
		if forAny(ha.Roles, roles) && !slices.Contains(sources, ha.HostSource) {
			sources = append(sources, ha.HostSource)
		}
	}
	out := make([]fetchResult, len(sources))
	var wg sync.WaitGroup
	sem := make(chan struct{}, max(jobs, 1))
	for i, s := range sources {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			size, fetched, err := f.Fetch(ctx, s.Location, s.SHA256)
			out[i] = fetchResult{size, fetched, err}
		}()
	}
	wg.Wait()
	m := map[render.HostSource]fetchResult{}
	for i, s := range sources {
		m[s] = out[i]
	}
	return m
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
