// A Talos-side client built from the upstream generated Go code (siderolabs/siderolink's
// api/siderolink and api/events, Talos machinery's machine and common packages): what Talos
// sends, on the wire, to sidero's Provision and event sink.  Used by
// tests/siderolink/test_go_client.py; prints one JSON object per command.
//
//	goclient provision <host:port> <uuid> <public key>
//	goclient publish <host:port>      (a fixed set of events, each as Talos packs it)
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/siderolabs/siderolink/api/events"
	pb "github.com/siderolabs/siderolink/api/siderolink"
	"github.com/siderolabs/talos/pkg/machinery/api/common"
	"github.com/siderolabs/talos/pkg/machinery/api/machine"
)

func fail(err error) {
	st, _ := status.FromError(err)
	out, _ := json.Marshal(map[string]string{"error": st.Message(), "code": st.Code().String()})
	fmt.Println(string(out))
	os.Exit(0)
}

func main() {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	conn, err := grpc.NewClient(os.Args[2], grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		fail(err)
	}
	defer conn.Close() //nolint:errcheck

	switch os.Args[1] {
	case "provision":
		token := "ignored-join-token"
		resp, err := pb.NewProvisionServiceClient(conn).Provision(ctx, &pb.ProvisionRequest{
			NodeUuid: os.Args[3], NodePublicKey: os.Args[4], JoinToken: &token,
		})
		if err != nil {
			fail(err)
		}
		out, _ := json.Marshal(map[string]any{
			"server_endpoint": resp.GetServerEndpoint(), "server_public_key": resp.GetServerPublicKey(),
			"node_address_prefix": resp.GetNodeAddressPrefix(), "server_address": resp.GetServerAddress(),
			"grpc_peer_addr_port": resp.GetGrpcPeerAddrPort(),
		})
		fmt.Println(string(out))
	case "publish":
		msgs := []proto.Message{
			&machine.AddressEvent{Hostname: "talos-go", Addresses: []string{"192.0.2.31", "198.51.100.7"}},
			&machine.ConfigValidationErrorEvent{Error: "machine.network: invalid"},
			&machine.PhaseEvent{Phase: "install", Action: machine.PhaseEvent_START},
			&machine.SequenceEvent{Sequence: "install", Action: machine.SequenceEvent_NOOP,
				Error: &common.Error{Code: common.Code_FATAL, Message: "failed to install: disk not found"}},
			&machine.ServiceStateEvent{Service: "etcd", Action: machine.ServiceStateEvent_RUNNING,
				Message: "Health check successful",
				Health: &machine.ServiceHealth{Healthy: true, LastChange: timestamppb.Now()}},
			&machine.TaskEvent{Task: "startAllServices", Action: machine.TaskEvent_STOP},
		}
		client := events.NewEventSinkServiceClient(conn)
		for i, m := range msgs {
			data, err := anypb.New(m)
			if err != nil {
				fail(err)
			}
			if _, err := client.Publish(ctx, &events.EventRequest{Data: data, Id: fmt.Sprintf("01JGO%021d", i)}); err != nil {
				fail(err)
			}
		}
		out, _ := json.Marshal(map[string]int{"published": len(msgs)})
		fmt.Println(string(out))
	}
}
