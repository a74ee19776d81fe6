# List the recipes.
default:
    @just --list

# Build the airadm binary into ./bin, stamped with its git version.
build:
    go build -ldflags "-X main.version=$(git describe --tags --always --dirty)" -o bin/airadm .

# Run the whole suite exactly as CI does (builds the pinned binaries first).
test *ARGS:
    ./hack/test {{ARGS}}

# Vet, check formatting, and check that no build output is committed.
lint:
    go vet ./...
    test -z "$(gofmt -l $(git ls-files '*.go'))"
    go test -run TestNoBuildOutputsCommitted .

# Run the benchmarks; ratios compare airadm with kubeadm measured in the same run.
bench:
    go run ./hack/k8sbin >/dev/null
    go test -run '^$' -bench . -benchtime 3x ./...

# Build or verify the pinned Kubernetes and etcd binaries in the cache.
k8sbin:
    go run ./hack/k8sbin

# The whole story on one machine: bundles built, a control plane and a worker applied, timed against kubeadm init.
e2e:
    ./hack/test -v -run TestEndToEnd ./internal/e2e

# A worker as a real machine: a Debian VM under QEMU with only its cloud-init seed attached joins a native control plane.
# Part of the suite (./hack/test, CI); this runs it alone. The first run builds the guest image (~5 min).
vm-e2e:
    ./hack/test -v -run TestVMWorker ./internal/e2e

# Not in CI: the control plane boots in a VM from its seed too (slow under TCG: allow half an hour).
vm-e2e-full:
    ./hack/test -v -tags vmfull -run TestVMFull ./internal/e2e

# Render the quickstart control plane and a worker under out/.
quickstart:
    rm -rf out/cp1 out/w1
    go run . render -c testdata/quickstart/cluster.toml -o out/cp1 cp1
    go run . render -c testdata/quickstart/cluster.toml -o out/w1 w1
