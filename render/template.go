package render

import _ "embed"

// Template is the commented cluster.toml that `airadm init` writes. It holds
// nothing secret and validates as it stands.
//
//go:embed cluster.toml.tmpl
var Template string
