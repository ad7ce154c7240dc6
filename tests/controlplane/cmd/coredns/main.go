// Command coredns is a minimal CoreDNS (github.com/coredns/coredns) built from
// the Go module proxy for the CoTrain test cluster: only the plugins needed to
// serve cluster DNS from the API server, with no upstream resolvers. It follows
// CoreDNS's coredns.go, but imports a few plugin packages instead of core/plugin
// (which pulls in every plugin and its cloud SDKs).
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

// directives lists the plugins compiled in, in CoreDNS's execution order
// (the order of core/dnsserver/zdirectives.go); a Corefile may use only these.
var directives = []string{
	"bind",
	"ready",
	"health",
	"errors",
	"log",
	"loadbalance",
	"cache",
	"kubernetes",
}

func init() {
	dnsserver.Directives = directives
}

func main() {
	coremain.Run()
}
