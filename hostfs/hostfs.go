// Package hostfs lays a node's files out on a host tree: each at its host
// path under a root ("/" on a real host), written atomically with its mode,
// in directories of the mode render.DirMode gives.
package hostfs

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"airadm.dev/airadm/atomicfile"
	"airadm.dev/airadm/render"
)

// Path maps a host path under root.
func Path(root, hostPath string) string {
	return filepath.Join(root, filepath.FromSlash(hostPath))
}

// WriteTree writes files under root.
func WriteTree(root string, files []render.File) error {
	for _, f := range files {
		if err := MkdirAll(root, filepath.Dir(f.Path)); err != nil {
			return err
		}
		if err := atomicfile.Write(Path(root, f.Path), f.Data, f.Mode); err != nil {
			return err
		}
	}
	return nil
}

// MkdirAll creates hostDir and its parents under root, each new one with
// render.DirMode; existing directories are left as they are.
func MkdirAll(root, hostDir string) error {
	if hostDir == "/" || hostDir == "." {
		if err := os.MkdirAll(root, 0o755); err != nil {
			return fmt.Errorf("creating %s: %w", root, err)
		}
		return nil
	}
	if err := MkdirAll(root, filepath.Dir(hostDir)); err != nil {
		return err
	}
	dst := Path(root, hostDir)
	if err := os.Mkdir(dst, render.DirMode(hostDir)); err != nil && !errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("creating %s: %w", dst, err)
	}
	return nil
}
