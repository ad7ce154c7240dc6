// Command etcd is a thin wrapper around the upstream etcd entry point
// (go.etcd.io/etcd/server/v3/etcdmain), as in go.etcd.io/etcd/server/v3's main.go.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
