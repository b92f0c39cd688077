package agent

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tether-io/tether/cluster"
	"github.com/tether-io/tether/internal/testutil"
	"github.com/tether-io/tether/proto/tetherpb"
)

// TestPlacementByLabels: copies go only to nodes carrying the volume's
// placement labels, and a placement no set of live nodes satisfies is
// refused with the reason.
func TestPlacementByLabels(t *testing.T) {
	tc := startTestClusterLabeled(t, cluster.Timing{}, []map[string]string{
		{"zone": "a", "disk": "ssd"}, {"zone": "a"}, {"zone": "b"},
	})
	ctl := tc.ctl["n3"]
	ctx := context.Background()
	testutil.EventuallyErr(t, 10*time.Second, func() error {
		resp, err := ctl.Members(ctx, &tetherpb.MembersRequest{})
		if err != nil {
			return err
		}
		for _, m := range resp.Members {
			if m.Name == "n1" && m.Labels["disk"] == "ssd" {
				return nil
			}
		}
		return context.DeadlineExceeded
	})
	resp, err := ctl.VolumeCreate(ctx, &tetherpb.VolumeCreateRequest{Name: "za", Replicas: 2, Placement: map[string]string{"zone": "a"}})
	if err != nil {
		t.Fatal(err)
	}
	nodes := append([]string{resp.Volume.Primary}, resp.Volume.ReplicaNodes...)
	slices.Sort(nodes)
	if !slices.Equal(nodes, []string{"n1", "n2"}) {
		t.Fatalf("zone=a volume placed on %v", nodes)
	}
	_, err = ctl.VolumeCreate(ctx, &tetherpb.VolumeCreateRequest{Name: "za3", Replicas: 3, Placement: map[string]string{"zone": "a"}})
	if err == nil || !strings.Contains(err.Error(), "2 of 3 alive nodes carry") {
		t.Fatalf("impossible placement: %v", err)
	}
	_, err = ctl.VolumeCreate(ctx, &tetherpb.VolumeCreateRequest{Name: "bad", Replicas: 1, Placement: map[string]string{"zone": "a b"}})
	if err == nil || !strings.Contains(err.Error(), "invalid labels") {
		t.Fatalf("bad placement label: %v", err)
	}
	if _, ok := tc.agent("n1").Cluster().Volume("bad"); ok {
		t.Fatal("a refused create left a volume")
	}
}
