package main

import (
	"crypto/rand"
	"os"
	"testing"
	"time"

	"github.com/rogpeppe/go-internal/testscript"
)

func TestMain(m *testing.M) {
	testscript.Main(m, map[string]func(){
		"airadm": func() {
			os.Exit(run(os.Args[1:], &Env{Stdout: os.Stdout, Stderr: os.Stderr, Now: time.Now, Rand: rand.Reader, Getenv: os.Getenv}))
		},
	})
}

// TestScript runs the CLI scenarios in testdata/script, each a txtar file
// of commands with their expected output and exit status.
func TestScript(t *testing.T) {
	testscript.Run(t, testscript.Params{Dir: "testdata/script"})
}
