//go:build airadm_testhooks

package main

import (
	"bytes"
	"os"
)

// upgradeManifestHook, in the upgrade e2e's build only, breaks the
// component that $AIRADM_TEST_BREAK_UPGRADE names: its new manifest gets a
// flag the binary does not know, so it exits at once and the upgrade must
// roll it back.
func upgradeManifestHook() func(component string, manifest []byte) []byte {
	broken := os.Getenv("AIRADM_TEST_BREAK_UPGRADE")
	if broken == "" {
		return nil
	}
	return func(component string, manifest []byte) []byte {
		if component != broken {
			return manifest
		}
		return bytes.Replace(manifest, []byte("    - "+component+"\n"), []byte("    - "+component+"\n    - --airadm-test-no-such-flag=true\n"), 1)
	}
}
