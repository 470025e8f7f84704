// Reference encoder for tests/siderolink/test_logreceiver.py: Go's own encoding/json does to
// each message what the Go log receiver does (spec 3.10): decode a stream of JSON objects
// into map[string]any, set the annotation fields given as arguments (key=value, empty values
// skipped), and write each with json.Encoder.  A decode error prints "ERROR <text>" and
// stops, as the receiver closes the connection.
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"strings"
)

func main() {
	fields := map[string]string{}
	for _, arg := range os.Args[1:] {
		k, v, _ := strings.Cut(arg, "=")
		if v != "" {
			fields[k] = v
		}
	}
	decoder := json.NewDecoder(bufio.NewReader(os.Stdin))
	encoder := json.NewEncoder(os.Stdout)
	for {
		msg := map[string]any{}
		if err := decoder.Decode(&msg); err != nil {
			if err.Error() != "EOF" {
				fmt.Printf("ERROR %s\n", err)
			}
			return
		}
		for k, v := range fields {
			msg[k] = v
		}
		if err := encoder.Encode(msg); err != nil {
			fmt.Printf("ERROR %s\n", err)
			return
		}
	}
}
