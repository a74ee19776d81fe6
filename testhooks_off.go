//go:build !airadm_testhooks

package main

// upgradeManifestHook is nil in every build but the upgrade e2e's
// (testhooks_on.go).
func upgradeManifestHook() func(component string, manifest []byte) []byte { return nil }
