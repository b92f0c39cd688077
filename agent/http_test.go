package agent

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/tether-io/tether/internal/testutil"
	"github.com/tether-io/tether/proto/tetherpb"
)

func httpGet(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(b)
}

// TestHTTPEndpoints: /healthz, /v1/status and /metrics show what an
// operator's monitoring needs, lag per volume and replica first.
func TestHTTPEndpoints(t *testing.T) {
	tc := startTestCluster(t)
	primary := tc.agents[0]
	if _, err := tc.ctl[primary.NodeName()].VolumeCreate(context.Background(), &tetherpb.VolumeCreateRequest{Name: "vol1", Replicas: 3}); err != nil {
		t.Fatal(err)
	}
	base := "http://" + primary.HTTPAddr()
	if code, body := httpGet(t, base+"/healthz"); code != http.StatusOK || !strings.HasPrefix(body, "ok") {
		t.Fatalf("/healthz: %d %q", code, body)
	}
	st, err := tc.ctl[primary.NodeName()].Status(context.Background(), &tetherpb.StatusRequest{})
	if err != nil || st.RaftTerm < 1 || st.Leader == "" {
		t.Fatalf("status: term %d leader %q err %v", st.GetRaftTerm(), st.GetLeader(), err)
	}
	if code, body := httpGet(t, base+"/v1/status"); code != http.StatusOK || !strings.Contains(body, `"node": "n1"`) {
		t.Fatalf("/v1/status: %d %q", code, body)
	}
	testutil.EventuallyErr(t, 15*time.Second, func() error {
		_, body := httpGet(t, base+"/metrics")
		for _, want := range []string{
			`tether_volume_primary{volume="vol1"} 1`,
			`tether_volume_epoch{volume="vol1"} 1`,
			`tether_replica_connected{replica="n2",volume="vol1"} 1`,
			`tether_replica_lag_seconds{replica="n3",volume="vol1"} 0`,
			`tether_replica_lag_bytes{replica="n3",volume="vol1"} 0`,
			`tether_replica_pending_cuts{replica="n3",volume="vol1"} 0`,
			`tether_volume_cut_failing{volume="vol1"} 0`,
			`tether_volume_cuts_total{volume="vol1"} `,
			`tether_volume_file_consistent_only_cuts_total{volume="vol1"} 0`,
			`tether_volume_changed_full_streams_total{outcome="continued",volume="vol1"} 0`,
			`tether_volume_changed_full_streams_total{outcome="spooled",volume="vol1"} 0`,
			`tether_replica_full_sync_remaining_bytes{replica="n3",volume="vol1"} 0`,
			`tether_lease_held 1`,
			`tether_members{health="alive"} 3`,
		} {
			if !strings.Contains(body, want) {
				return fmt.Errorf("/metrics lacks %s", want)
			}
		}
		return nil
	})
}
